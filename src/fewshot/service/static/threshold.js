// The workspace's unknown threshold and why (GET /workspaces/{ws}: `threshold_why`, the served
// decision's own explanation, fewshot.service.verdict), with the control that changes it (PATCH).
// Loaded after app.js and uses its helpers ($, api, workspace, guarded, showError); refreshed on
// "fewshot:classes-changed", since the number of classes and examples can move the limit.
"use strict";

(() => {
  let seq = 0; // only the newest answer is drawn when refreshes overlap

  function render(ws) {
    const why = ws.threshold_why;
    $("threshold").hidden = false;
    if (!why) { // the model has no calibrated rule and the workspace set no threshold
      $("threshold-why").textContent = "No 'unknown' rule: every image is answered with its nearest class. Set a threshold to answer 'unknown' when an image is far from every class.";
      $("threshold-table").hidden = true;
      $("threshold-value").value = "";
      $("threshold-note").textContent = "";
      return;
    }
    $("threshold-why").textContent = `Answered ${why.why}.`;
    const rows = Object.entries(why.by_examples || {});
    $("threshold-table").hidden = rows.length === 0;
    $("threshold-table").tBodies[0].replaceChildren(...rows.map(([n, t]) => {
      const tr = document.createElement("tr");
      for (const text of [n, t.toFixed(3)]) tr.append(Object.assign(document.createElement("td"), { textContent: text }));
      return tr;
    }));
    $("threshold-value").value = String(why.threshold);
    $("threshold-note").textContent = why.setting;
  }

  async function refresh() {
    if (!workspace) return;
    const mine = ++seq;
    const ws = await api("GET", `/workspaces/${encodeURIComponent(workspace.id)}`);
    if (mine === seq) render(ws);
  }

  async function change(body) {
    render(await api("PATCH", `/workspaces/${encodeURIComponent(workspace.id)}`, { body }));
  }

  document.addEventListener("fewshot:classes-changed", () => { refresh().catch(showError); });
  $("threshold-form").addEventListener("submit", (e) => {
    e.preventDefault();
    guarded(e.submitter, () => change({ threshold: Number($("threshold-value").value) }));
  });
  $("threshold-reset").addEventListener("click", (e) => guarded(e.currentTarget, () => change({ clear_threshold: true })));
  if (workspace) refresh().catch(showError); // app.js may have opened a stored workspace before this ran
})();
