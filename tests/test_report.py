"""The browser check itself can fail: a broken picture and a script error are seen."""

from __future__ import annotations

from browser import open_page


def test_the_browser_check_sees_broken_images_and_script_errors(tmp_path):
    page = tmp_path / "page.html"
    page.write_text(
        "<!DOCTYPE html><html><head><title>t</title></head><body><p>hello</p>"
        '<img alt="fine" src="data:image/gif;base64,'
        'R0lGODlhAQABAIAAAP///wAAACH5BAEAAAAALAAAAAABAAEAAAICRAEAOw==">'
        '<img alt="broken" src="missing.png"><script>undefinedFunction()</script></body></html>'
    )
    seen = open_page(page, tmp_path / "shot.png")
    assert seen.images == 2 and seen.broken_images == ["broken"]
    assert any("undefinedFunction" in error for error in seen.console_errors)
    assert seen.text.strip() == "hello" and (tmp_path / "shot.png").stat().st_size > 0
