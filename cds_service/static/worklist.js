// cds-triage worklist: renders rows from JSON, polls for changes, filters, keyboard navigation.
// Plain DOM (textContent only, never innerHTML with data), no libraries, no CDN.
"use strict";
(function () {
  const table = document.getElementById("worklist");
  const body = table.tBodies[0];
  const modality = document.getElementById("filter-modality");
  const priority = document.getElementById("filter-priority");
  const form = document.getElementById("filters");
  const updated = document.getElementById("updated");
  const announce = document.getElementById("announce");
  const refreshMs = Math.max(1, Number(table.dataset.refreshS) || 5) * 1000;
  let rows = JSON.parse(document.getElementById("worklist-data").textContent);
  let signature = "";

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined) node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child !== null && child !== undefined && child !== "") node.append(child);
    }
    return node;
  }

  function localTime(iso) {
    if (!iso) return "";
    const when = new Date(iso);
    return when.toLocaleString(undefined, { day: "2-digit", month: "short", hour: "2-digit", minute: "2-digit" });
  }

  function rowElement(row) {
    const tr = el("tr", { "data-order": row.orderId, "data-priority": row.priority, "data-modality": row.modality });
    const badge = el("span", { class: "badge priority-" + row.priority }, row.priority);
    const raised = row.aiRaisedFrom ? el("span", { class: "raised" }, "raised by AI from " + row.aiRaisedFrom) : null;
    tr.append(el("td", {}, badge, raised));
    tr.append(el("td", {}, el("span", { class: "patient" }, row.patient), el("span", { class: "sub" }, row.patientDetails)));
    const what = [row.modality, row.bodyPart].filter(Boolean).join(" · ");
    tr.append(el("td", {}, what, el("span", { class: "sub" }, row.study)));
    tr.append(el("td", {}, row.ordered ? el("time", { datetime: row.ordered }, localTime(row.ordered)) : ""));
    tr.append(el("td", {}, row.waiting));
    let finding = "—";
    if (row.topFinding) {
      const probability = row.topFinding.probability;  // null: the report names it, its Observation was not returned
      finding = el("span", {}, el("span", { class: "finding" }, row.topFinding.display),
        probability == null ? "" : " " + Math.round(probability * 100) + " %",
        row.shadow ? el("span", { class: "sub shadow" }, "shadow mode: not used to order") : null,
        row.unfamiliar ? el("span", { class: "sub unfamiliar", title: "the images were unlike the model's training images" },
          "unfamiliar images: read with care") : null);
    } else if (row.status === "done") {
      finding = "no finding above threshold";
    }
    tr.append(el("td", {}, finding));
    tr.append(el("td", {}, row.model || ""));
    tr.append(el("td", {}, el("span", { class: "status status-" + row.status.replace(/ /g, "-") }, row.status.replace(/_/g, " ")),
      row.reason ? el("span", { class: "sub" }, row.reason) : null));
    const open = el("a", { class: "open", href: row.url, "aria-label": "Open study of " + row.patient }, "Open");
    const viewer = row.viewerUrl ? el("a", { class: "viewer-link", href: row.viewerUrl, target: "_blank", rel: "noopener noreferrer",
      "aria-label": "Open the images of " + row.patient + " in the viewer" }, "Open in viewer") : null;
    tr.append(el("td", {}, open, viewer ? " " : null, viewer));
    return tr;
  }

  function matches(row) {
    return (!modality.value || row.modality.split(", ").includes(modality.value)) &&
      (!priority.value || row.priority === priority.value);
  }

  function updateModalityOptions() {
    const wanted = modality.value;
    const values = [...new Set(rows.flatMap((r) => r.modality ? r.modality.split(", ") : []))].sort();
    if (wanted && !values.includes(wanted)) values.push(wanted);
    const current = [...modality.options].slice(1).map((o) => o.value);
    if (current.join("|") === values.join("|")) return;
    modality.replaceChildren(el("option", { value: "" }, "All modalities"), ...values.map((v) => el("option", { value: v }, v)));
    modality.value = wanted;
  }

  function render() {
    const focused = document.activeElement && document.activeElement.closest("tr[data-order]");
    const focusedOrder = focused ? focused.dataset.order : null;
    updateModalityOptions();
    const shown = rows.filter(matches);
    const children = shown.map(rowElement);
    if (!children.length) {
      children.push(el("tr", {}, el("td", { colspan: "9" }, rows.length ? "No orders match the filters." : "No imaging orders.")));
    }
    body.replaceChildren(...children);
    if (focusedOrder) {
      const again = body.querySelector(`tr[data-order="${CSS.escape(focusedOrder)}"] a.open`);
      if (again) { again.focus(); markCurrent(again); }
    }
    table.dataset.count = String(shown.length);
  }

  // The drift alarms (tasks raising a share of studies their card does not expect), kept current;
  // redrawn only when they change, so a screen reader announces each change once.
  let driftShown = null;
  function renderDrift(alarms) {
    const box = document.getElementById("drift-alarms");
    const next = JSON.stringify(alarms.map((a) => [a.task, a.message]));
    if (!box || next === driftShown) return;
    driftShown = next;
    box.replaceChildren(...alarms.map((a) => el("p", { class: "drift-alarm", "data-task": a.task },
      el("strong", {}, "Drift alarm."), " " + a.message + " " + a.advice)));
  }

  async function refresh() {
    try {
      const response = await fetch(table.dataset.rowsUrl, { cache: "no-store", credentials: "same-origin",
        headers: { Accept: "application/json" } });
      if (!response.ok) throw new Error("HTTP " + response.status);
      const data = await response.json();
      const next = JSON.stringify(data.rows.map((r) => [r.orderId, r.priority, r.status, r.topFinding]));
      if (signature && next !== signature) announce.textContent = "Worklist updated.";
      signature = next;
      rows = data.rows;
      render();
      renderDrift(data.drift || []);
      updated.textContent = "Updated " + new Date().toLocaleTimeString();
      table.dataset.refreshed = String(Date.now());
    } catch (err) {
      updated.textContent = "Could not refresh (" + err.message + "); retrying…";
    } finally {
      window.setTimeout(refresh, refreshMs);
    }
  }

  function links() { return [...body.querySelectorAll("a.open")]; }

  function markCurrent(link) {
    for (const tr of body.querySelectorAll("tr.is-current")) tr.classList.remove("is-current");
    link.closest("tr").classList.add("is-current");
  }

  function move(delta) {
    const all = links();
    if (!all.length) return;
    const index = all.indexOf(document.activeElement);
    const next = index < 0 ? (delta > 0 ? 0 : all.length - 1) : Math.min(all.length - 1, Math.max(0, index + delta));
    all[next].focus();
    markCurrent(all[next]);
  }

  document.addEventListener("keydown", (event) => {
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    const inField = event.target.closest("select, input, textarea");
    if (inField) {
      if (event.key === "Escape") { event.target.blur(); move(0); }
      return;
    }
    if (event.key === "j" || event.key === "ArrowDown") { move(1); event.preventDefault(); }
    else if (event.key === "k" || event.key === "ArrowUp") { move(-1); event.preventDefault(); }
    else if (event.key === "Home") { move(-Infinity); event.preventDefault(); }
    else if (event.key === "End") { move(Infinity); event.preventDefault(); }
    else if (event.key === "/") { modality.focus(); event.preventDefault(); }
  });
  body.addEventListener("focusin", (event) => { if (event.target.matches("a.open")) markCurrent(event.target); });
  modality.addEventListener("change", render);
  priority.addEventListener("change", render);
  form.addEventListener("reset", () => window.setTimeout(render, 0));
  form.addEventListener("submit", (event) => event.preventDefault());

  render();
  window.setTimeout(refresh, refreshMs);
})();
