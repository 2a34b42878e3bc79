"""Sphinx extension for the lora_course book: emit each <script> only once per page.

sphinx-thebe adds its inline settings script (``const THEBE_JS_URL = ...``) every time
Sphinx fires ``env-before-read-docs``, which happens twice in a Jupyter Book 1.x build.
The two copies differ only in their empty file name (``None`` once, ``""`` once), so
Sphinx keeps both, every page declared the same ``const`` twice, and the browser
reported "Identifier 'THEBE_JS_URL' has already been declared". tests/test_browser.py
fails on any uncaught page error, so we drop the repeats here.
"""


def _drop_repeated_scripts(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if not isinstance(scripts, list):
        return
    seen, unique = set(), []
    for script in scripts:
        # An inline script has no file name and carries its text in attributes["body"].
        key = (script.filename or "", script.priority, tuple(sorted(script.attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def setup(app):
    app.connect("html-page-context", _drop_repeated_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
