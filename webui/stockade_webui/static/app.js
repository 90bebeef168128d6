// Stockade web UI: the only script. Filters tables as you type and refreshes the
// flows table; every page works without it.
"use strict";

function filterTables(input) {
  const q = input.value.trim().toLowerCase();
  document.querySelectorAll(input.dataset.filterTables).forEach((table) => {
    table.querySelectorAll("tbody tr:not(.empty)").forEach((tr) => {
      tr.hidden = q !== "" && !tr.textContent.toLowerCase().includes(q);
    });
  });
}

function startFlowRefresh(table) {
  const body = table.querySelector("tbody");
  const toggle = document.getElementById("autorefresh");
  let timer = null;
  async function refresh() {
    if (toggle && !toggle.checked) return;
    try {
      const resp = await fetch(table.dataset.refresh, { credentials: "same-origin", headers: { "Accept": "text/html" } });
      if (!resp.ok) return;
      const seen = new Set(Array.from(body.rows).map((r) => r.textContent));
      body.innerHTML = await resp.text();
      Array.from(body.rows).forEach((r) => { if (!seen.has(r.textContent)) r.classList.add("fresh"); });
    } catch (e) { /* the next tick tries again */ }
  }
  timer = setInterval(refresh, 2000);
  document.addEventListener("visibilitychange", () => {
    if (document.hidden) { clearInterval(timer); timer = null; }
    else if (!timer) { refresh(); timer = setInterval(refresh, 2000); }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("input[data-filter-tables]").forEach((input) => {
    input.addEventListener("input", () => filterTables(input));
  });
  const flows = document.querySelector("table.flows[data-refresh]");
  if (flows) startFlowRefresh(flows);
});
