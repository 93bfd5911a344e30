// vaultgate dashboard: progressive enhancement only. Every action is a
// plain form that works without this file. No secret is ever written to
// storage; the Copy button reads the key from the page it is on.
"use strict";
document.addEventListener("click", function (ev) {
  var t = ev.target.closest("[data-dialog],[data-close],[data-copy],[data-done]");
  if (!t) return;
  if (t.hasAttribute("data-dialog")) {
    var d = document.getElementById(t.getAttribute("data-dialog"));
    if (d && typeof d.showModal === "function") {
      ev.preventDefault();
      d.showModal();
      var first = d.querySelector("input:not([type=hidden]),select");
      if (first) first.focus();
    }
  } else if (t.hasAttribute("data-close")) {
    var dlg = t.closest("dialog");
    if (dlg) dlg.close(); else window.location.assign("/ui/keys");
  } else if (t.hasAttribute("data-copy")) {
    var el = document.getElementById(t.getAttribute("data-copy"));
    if (!el) return;
    var done = function () { t.textContent = "Copied"; };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(el.textContent).then(done, function () {});
    } else {
      var r = document.createRange();
      r.selectNodeContents(el);
      var s = window.getSelection();
      s.removeAllRanges();
      s.addRange(r);
      if (document.execCommand("copy")) done();
      s.removeAllRanges();
    }
  } else if (t.hasAttribute("data-done")) {
    // The key leaves the page before the next one loads.
    var k = document.getElementById("new-key");
    if (k) k.textContent = "";
  }
});
