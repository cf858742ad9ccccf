"""Build a torchvision or timm classifier with a fresh output layer, and its preprocessing metadata.

``arch`` is a torchvision classification model name (``resnet18``) or ``timm/<name>``.
``weights`` is ``imagenet`` (the library's own pretrained weights, via its normal cache),
``none`` (random init), or the path of a state-dict file in the library's own key layout.
"""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path

import timm
import timm.data
import torch
import torchvision
from torch import nn

from .checkpoint import load_torch_file
from .errors import ModelError
from .inputs import Preprocessing

TIMM_PREFIX = "timm/"


def torchvision_names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def _load_state_dict_file(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except SafetensorError as err:
            raise ModelError(f"{path} is not a readable safetensors file ({err})") from err
    state = load_torch_file(path)
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelError(f"{path} does not hold a state dict")
    return state


def _load_weights_file(model: nn.Module, path: Path, arch: str) -> None:
    try:
        model.load_state_dict(_load_state_dict_file(path))
    except RuntimeError as err:
        first_lines = "\n".join(str(err).splitlines()[:4])
        raise ModelError(f"weights file {path} does not fit {arch}: {first_lines}") from err


def check_model(arch: str, weights: str) -> None:
    """Fail before any work, naming the param, on an unknown architecture or a missing weights file."""
    if arch.startswith(TIMM_PREFIX):
        name = arch[len(TIMM_PREFIX) :]
        if not timm.is_model(name):
            raise ModelError(f"model.arch: {arch} is not a timm model (see timm.list_models())")
        pretrained = timm.models.get_pretrained_cfg(name)
        if weights == "imagenet" and not (
            pretrained and (pretrained.hf_hub_id or pretrained.url or pretrained.file)
        ):
            raise ModelError(
                f"model.weights: timm has no pretrained weights for {arch}; use 'none' or a weights file"
            )
    elif arch not in torchvision_names():
        raise ModelError(
            f"model.arch: {arch!r} is neither a torchvision classification model "
            f"(one of {', '.join(torchvision_names())}) nor timm/<name>"
        )
    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        raise ModelError(
            f"model.weights: no such file {weights} (expected 'imagenet', 'none' or a state-dict file)"
        )


def _unreachable_weights(arch: str, where: str, err: OSError) -> ModelError:
    reason = textwrap.shorten(
        (str(err).strip().splitlines() or [type(err).__name__])[0], 200, placeholder=" …"
    )
    return ModelError(
        f"model.weights: imagenet: the ImageNet weights of {arch} are not on this machine "
        f"and could not be downloaded ({type(err).__name__}: {reason}). Looked for {where}. "
        "With network, run again (they are downloaded once, into that cache); offline, copy them there, "
        "or set model.weights to a state-dict file (.pth or .safetensors)"
    )


def _timm_model(name: str, weights: str) -> tuple[nn.Module, Preprocessing]:
    try:
        model = timm.create_model(name, pretrained=weights == "imagenet")
    # huggingface_hub's LocalEntryNotFoundError, a URLError: no network and not in the cache
    except OSError as err:
        from huggingface_hub import constants

        hub_id = timm.models.get_pretrained_cfg(name).hf_hub_id
        offline = "on" if constants.HF_HUB_OFFLINE else "off"
        where = (
            f"{hub_id} in the Hugging Face cache {constants.HF_HUB_CACHE} "
            f"(HF_HOME; HF_HUB_OFFLINE is {offline})"
        )
        raise _unreachable_weights(TIMM_PREFIX + name, where, err) from err
    config = timm.data.resolve_data_config({}, model=model)
    prep = Preprocessing(
        tuple(config["mean"]), tuple(config["std"]), config["interpolation"], config["crop_pct"]
    )
    return model, prep


# these builders add auxiliary classifiers (a tuple output in training) unless told not to
NO_AUX_LOGITS = {"googlenet", "inception_v3"}


def _torchvision_model(name: str, weights: str) -> tuple[nn.Module, Preprocessing]:
    default = torchvision.models.get_model_weights(name).DEFAULT
    options = {"aux_logits": False} if name in NO_AUX_LOGITS else {}
    try:
        model = torchvision.models.get_model(
            name, weights=default if weights == "imagenet" else None, **options
        )
    except OSError as err:  # a URLError: no network, and not in torchvision's cache
        import torch.hub

        where = (
            f"{Path(default.url).name} in torchvision's cache "
            f"{Path(torch.hub.get_dir()) / 'checkpoints'} (TORCH_HOME)"
        )
        raise _unreachable_weights(name, where, err) from err
    transform = default.transforms()
    prep = Preprocessing(
        tuple(transform.mean),
        tuple(transform.std),
        transform.interpolation.value,
        transform.crop_size[0] / transform.resize_size[0],
    )
    return model, prep


def _replace_torchvision_head(model: nn.Module, num_classes: int) -> str:
    """Swap the last Linear (or 1x1 conv, as in SqueezeNet) layer for a fresh ``num_classes``-way one."""
    name, layer = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    if isinstance(layer, nn.Linear):
        fresh = nn.Linear(layer.in_features, num_classes)
    else:
        fresh = nn.Conv2d(layer.in_channels, num_classes, kernel_size=1)
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, fresh)
    return name


def build_model(
    arch: str, weights: str, num_classes: int, layers: list[str] = ()
) -> tuple[nn.Module, str, Preprocessing]:
    """Return the model with a freshly initialised ``num_classes``-way head, the head's module name, and its
    preprocessing. With ``layers``, a :class:`LayerClassifier` whose head reads those modules' pooled
    outputs too."""
    check_model(arch, weights)
    is_timm = arch.startswith(TIMM_PREFIX)
    model, prep = (
        _timm_model(arch[len(TIMM_PREFIX) :], weights) if is_timm else _torchvision_model(arch, weights)
    )
    if weights not in ("imagenet", "none"):
        _load_weights_file(model, Path(weights), arch)
    if is_timm:
        model.reset_classifier(num_classes)
        head = next(n for n, m in model.named_modules() if m is model.get_classifier())
    else:
        head = _replace_torchvision_head(model, num_classes)
    if layers:
        return with_layers(model, head, list(layers), num_classes, arch), "head", prep
    return model, head, prep


def native_size(arch: str) -> int:
    """The resolution the ImageNet weights were evaluated at (their pretrained config; 224 if none)."""
    if arch.startswith(TIMM_PREFIX):
        pretrained = timm.models.get_pretrained_cfg(arch[len(TIMM_PREFIX) :])
        return pretrained.input_size[-1] if pretrained else 224
    return torchvision.models.get_model_weights(arch).DEFAULT.transforms().crop_size[0]


def without_head(model: nn.Module, head: nn.Module) -> nn.Module:
    """A copy of ``model`` whose output is what ``head`` receives (the backbone's pooled features)."""
    name = next(n for n, m in model.named_modules() if m is head)
    body = copy.deepcopy(model)
    body.set_submodule(name, nn.Identity())
    return body


def tap_candidates(model: nn.Module, head: str) -> list[str]:
    """Modules whose pooled outputs may join the head's features, input side first: the first module of
    each backbone layer after the stem (EfficientNet: ``blocks.0`` .. ``blocks.6``; ResNet: ``layer1`` ..
    ``layer3``), leaving out a last layer whose pooled output is the head's input itself."""
    layers = backbone_layers(model, head)[1:]
    if layers and len(layers[-1]) == 1:
        layers = layers[:-1]
    return [layer[0] for layer in layers]


class LayerClassifier(nn.Module):
    """A network whose classifier reads, beside what its own head received, the global-average-pooled
    outputs of some of its modules (``features.layers``), concatenated in the order given, its own last.

    Earlier blocks keep more of what transfers to a new task than the penultimate layer, which ImageNet's
    label smoothing and dropout shape for ImageNet (Kornblith et al., CVPR 2019 and NeurIPS 2021). The
    linear probe fitted on these features becomes ``head`` (its standardisation folded into the weights),
    so LP-FT fine-tunes the very network whose features the probe read.
    """

    def __init__(self, model: nn.Module, head: str, layers: list[str], num_classes: int):
        super().__init__()
        self.body = without_head(model, model.get_submodule(head))
        self.inner_head, self.layers, self._pooled = head, list(layers), []
        for name in self.layers:
            self.body.get_submodule(name).register_forward_hook(self._keep)
        was_training = self.body.training
        with torch.no_grad():  # the widths, from one small image (in eval mode: no statistics updated)
            last = self.body.eval()(torch.zeros(1, 3, 64, 64))
        self.dims = [pooled.shape[1] for pooled in self._pooled] + [last.shape[1]]
        self._pooled = []
        self.body.train(was_training)
        self.head = nn.Linear(sum(self.dims), num_classes)

    def _keep(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        self._pooled.append(output.mean((2, 3)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._pooled = []
        last = self.body(images)
        pooled, self._pooled = self._pooled, []  # no tensor kept between calls (a copy of the model, ...)
        return self.head(torch.cat([*pooled, last], 1))


def read_layers(model: nn.Module) -> list[str]:
    """The modules whose pooled outputs the model's head reads besides its own features (none: [])."""
    return model.layers if isinstance(model, LayerClassifier) else []


def with_layers(model: nn.Module, head: str, layers: list[str], num_classes: int, arch: str) -> nn.Module:
    """``model`` as a :class:`LayerClassifier` reading ``layers``, each checked (the param named)."""
    modules = dict(model.named_modules())
    for name in layers:
        if name not in modules or name == head or name == "":
            choices = ", ".join(tap_candidates(model, head))
            raise ModelError(f"features.layers: {name!r} is not a block of {arch} (its blocks: {choices})")
    if len(set(layers)) < len(layers):
        raise ModelError(f"features.layers: {layers} names a block twice")
    try:
        return LayerClassifier(model, head, layers, num_classes)
    except (RuntimeError, IndexError) as err:  # a module whose output is no N x C x H x W grid
        raise ModelError(f"features.layers: {layers}: each must output feature maps to pool ({err})") from err


def linear_head(model: nn.Module, head_name: str) -> nn.Linear:
    """The model's classifier, which a linear probe replaces and whose input is the frozen features."""
    head = model.get_submodule(head_name)
    if not isinstance(head, nn.Linear):
        raise ModelError(
            "frozen features are what the final Linear layer receives, "
            f"but this model's classifier is a {type(head).__name__}"
        )
    return head


NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def _trainable_parts(module: nn.Module, head: nn.Module) -> list[tuple[str, nn.Module]]:
    head_ids = {id(p) for p in head.parameters()}
    return [
        (name, child)
        for name, child in module.named_children()
        if child is not head and any(id(p) not in head_ids for p in child.parameters())
    ]


def _torchvision_layers(module: nn.Module, head: nn.Module, prefix: str = "") -> list[list[str]]:
    """A torchvision model's parameterised top-level parts, input side first.

    A level that is only a wrapper (at most two parts besides the head, such as AlexNet's
    ``features`` + ``classifier``) is opened, until the parts are real layers (conv1..conv5, fc6, fc7).
    A normalisation layer joins the layer before it (ResNet's stem is ``conv1`` + ``bn1``).
    """
    parts = _trainable_parts(module, head)
    layers: list[list[str]] = []
    for name, child in parts:
        if len(parts) <= 2 and any(True for _ in child.children()):
            layers.extend(_torchvision_layers(child, head, f"{prefix}{name}."))
        elif isinstance(child, NORM_LAYERS) and layers:
            layers[-1].append(prefix + name)
        else:
            layers.append([prefix + name])
    return layers


def backbone_layers(model: nn.Module, head: str) -> list[list[str]]:
    """The pretrained body as consecutive layers (lists of module names), input side first; the head
    excluded. A layer here is a top-level part of the network: what ``train.frozen_layers`` counts.

    timm models define their own (``group_matcher(coarse=True)``: the stem, then each group of blocks);
    torchvision models are split by :func:`_torchvision_layers`. ResNet-18 gives
    stem, layer1, layer2, layer3, layer4 in both libraries.
    """
    if isinstance(model, LayerClassifier):
        return [[f"body.{name}" for name in layer] for layer in backbone_layers(model.body, model.inner_head)]
    if hasattr(model, "group_matcher"):
        groups = timm.models.group_modules(model, model.group_matcher(coarse=True))
        return [_outermost(model, names) for names in groups.values() if head not in names]
    return _torchvision_layers(model, model.get_submodule(head))


def _outermost(model: nn.Module, names: list[str]) -> list[str]:
    """The largest modules made only of the named parameter-holding modules
    (``layer1`` for ``layer1.0.conv1``, ...)."""
    owners = {n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    members, outer = set(names), []
    for name in names:
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth])
            if {n for n in owners if n == prefix or n.startswith(prefix + ".")} <= members:
                if prefix not in outer:
                    outer.append(prefix)
                break
    return outer


def freeze_layers(model: nn.Module, head: str, count: int) -> list[str]:
    """Stop gradients into the first ``count`` backbone layers; return their module names
    (to keep in eval mode)."""
    layers = backbone_layers(model, head)
    if count > len(layers):
        raise ModelError(
            f"train.frozen_layers: {count} is more than the {len(layers)} layers of this model's backbone"
        )
    frozen = [name for layer in layers[:count] for name in layer]
    for name in frozen:
        model.get_submodule(name).requires_grad_(False)
    return frozen


def parameter_groups(
    model: nn.Module,
    head: str,
    lr: float,
    backbone_lr_scale: float | None,
    weight_decay: float,
    decay_norm_and_bias: bool,
) -> list[dict]:
    """Optimizer groups for the trainable parameters.

    One learning rate for everything (``backbone_lr_scale`` None: scratch), or the new head at ``lr`` and the
    pretrained rest at ``lr * backbone_lr_scale``. Unless ``decay_norm_and_bias``, biases and normalisation
    weights (every parameter with fewer than two dimensions) get no weight decay, as in timm and torchvision.
    """
    head_ids = {id(p) for p in model.get_submodule(head).parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    if backbone_lr_scale is None:
        parts = [("all", trainable, lr)]
    else:
        parts = [
            ("backbone", [p for p in trainable if id(p) not in head_ids], lr * backbone_lr_scale),
            ("head", [p for p in trainable if id(p) in head_ids], lr),
        ]
    groups = []
    for name, params, group_lr in parts:
        decayed = [p for p in params if decay_norm_and_bias or p.ndim > 1]
        undecayed = [p for p in params if not (decay_norm_and_bias or p.ndim > 1)]
        for selected, decay in ((decayed, weight_decay), (undecayed, 0.0)):
            if selected:
                groups.append({"name": name, "params": selected, "lr": group_lr, "weight_decay": decay})
    return groups


def set_train_mode(model: nn.Module, frozen_modules: list[str], freeze_bn: bool) -> None:
    """Training mode, except frozen layers (no dropout, fixed batch-norm statistics) and, if asked,
    every batch norm."""
    model.train()
    for name in frozen_modules:
        model.get_submodule(name).eval()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
