// lora_course book: runs after require.js and before embed-amd.js (see ../README.md).
(function () {
  // 1. Fonts. The widget bundle looks for its font files next to its RequireJS module
  //    path, which by default resolves relative to the page
  //    ("notebooks/@jupyter-widgets/html-manager/dist/"). Point it at this folder.
  var here = document.currentScript.src.replace(/[^/]*$/, ""); // .../_static/html-manager/
  window.__jupyter_widgets_assets_path__ = here;
  require.config({ paths: { "@jupyter-widgets/html-manager/dist": here.slice(0, -1) } });

  // 2. Math in widget labels. The bundle typesets descriptions with MathJax 2's
  //    MathJax.Hub.Queue(["Typeset", MathJax.Hub, element]); the book runs MathJax 3,
  //    which has no Hub, so every labelled widget threw a TypeError. Give whatever
  //    object window.MathJax holds (Sphinx's config now, MathJax 3 once it loads) a
  //    small non-enumerable Hub that forwards to MathJax 3's typesetPromise.
  function typeset(element) {
    var mathjax = current;
    if (mathjax && mathjax.startup && mathjax.startup.promise) {
      mathjax.startup.promise.then(function () {
        return mathjax.typesetPromise([element]);
      });
    } else {
      window.addEventListener("load", function () { typeset(element); }, { once: true });
    }
  }
  var hub = {
    Queue: function (job) {
      if (Array.isArray(job) && job[0] === "Typeset" && job[2]) typeset(job[2]);
    },
  };
  function withHub(value) {
    if (value && typeof value === "object" && !value.Hub) {
      Object.defineProperty(value, "Hub", { value: hub, enumerable: false, configurable: true });
    }
    return value;
  }
  var current = withHub(window.MathJax); // stays undefined on pages without math
  Object.defineProperty(window, "MathJax", {
    configurable: true,
    get: function () { return current; },
    set: function (value) { current = withHub(value); },
  });
})();
