// cds-triage study view: heatmap opacity slider, original/overlay toggle, local times, Esc = back.
"use strict";
(function () {
  for (const node of document.querySelectorAll("time.local-time")) {
    node.textContent = new Date(node.getAttribute("datetime")).toLocaleString();
  }
  const back = document.getElementById("back");
  document.addEventListener("keydown", (event) => {
    if (event.altKey || event.ctrlKey || event.metaKey || event.target.closest("input, select, textarea")) return;
    if (event.key === "Escape" && back) window.location.assign(back.href);
    if (event.key === "t" && toggle) toggle.click();
  });

  const overlay = document.getElementById("overlay");
  const keyImage = document.getElementById("key-image");
  const slider = document.getElementById("opacity");
  const output = document.getElementById("opacity-value");
  const toggle = document.getElementById("toggle");
  if (!overlay || !slider || !toggle) return;

  function apply() {
    const showingOriginal = toggle.getAttribute("aria-pressed") === "true";
    overlay.style.opacity = showingOriginal ? "0" : String(Number(slider.value) / 100);
    output.textContent = slider.value + " %";
    toggle.textContent = showingOriginal ? "Show overlay" : "Show original";
    slider.disabled = showingOriginal;
  }
  slider.addEventListener("input", apply);
  toggle.addEventListener("click", () => {
    toggle.setAttribute("aria-pressed", toggle.getAttribute("aria-pressed") === "true" ? "false" : "true");
    apply();
  });
  function keyImageMissing() {
    keyImage.hidden = true;
    overlay.style.position = "static";
    document.getElementById("key-image-missing").hidden = false;
  }
  if (keyImage.complete && keyImage.naturalWidth === 0) keyImageMissing();
  keyImage.addEventListener("error", keyImageMissing);
  apply();
})();
