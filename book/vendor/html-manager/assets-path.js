// Loaded after require.js and before embed-amd.js. The widget bundle finds its
// font files next to its RequireJS module path, which by default is resolved
// relative to the page ("notebooks/@jupyter-widgets/html-manager/dist/"). Point
// that module path, and the bundle's asset path, at this folder instead.
(function () {
  var here = document.currentScript.src.replace(/[^/]*$/, ""); // .../_static/html-manager/
  window.__jupyter_widgets_assets_path__ = here;
  require.config({ paths: { "@jupyter-widgets/html-manager/dist": here.slice(0, -1) } });
})();
