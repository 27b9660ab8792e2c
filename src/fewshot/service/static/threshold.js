// The workspace's decision, drawn from GET /workspaces/{ws}:
// - the unknown threshold and why (`threshold_why`, the served decision's own explanation,
//   fewshot.service.verdict), with the control that changes it (PATCH);
// - the "Train" step: POST /workspaces/{ws}/adapt measures the two heads ("prototype", the nearest
//   class average, and "logistic", a linear probe) on the workspace's own examples by 5-fold
//   cross-validation and serves the one that answers more of them right (fewshot.service.adapt);
//   its last report is stored with the settings (`settings.adapted`, cleared when the head or metric
//   is changed by hand) and shown when the workspace loads.
// Loaded after app.js and uses its helpers ($, api, wsPath, workspace, guarded, showError); refreshed
// on "fewshot:classes-changed", since the number of classes and examples can move the limit and makes
// a stored report out of date. After a change it announces "fewshot:workspace-changed" (panel.js).
"use strict";

(() => {
  let seq = 0; // only the newest answer is drawn when refreshes overlap

  function renderThreshold(ws) {
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

  // -- the Train step ---------------------------------------------------------------------------------
  const HEADS = {
    prototype: "prototype head (the nearest class average)",
    logistic: "logistic head (a linear classifier fitted to your examples)",
  };
  const plural = (n, word, many = `${word}s`) => `${n} ${n === 1 ? word : many}`;
  const scoreText = (s) => `${s.head} ${s.right} of ${s.evaluated} right`; // "prototype 21 of 40 right"

  function whenText(unix) {
    const d = new Date(unix * 1000);
    return Number.isNaN(d.getTime()) ? "" : ` ${d.toLocaleString()}`;
  }

  function renderTrain(ws, fresh) {
    const head = ws.settings?.head;
    $("train-head").textContent = head ? `Served now: the ${HEADS[head] ?? `${head} head`}.` : "";
    $("train-head").dataset.head = head || "";
    const report = ws.settings?.adapted ?? null;
    $("train-result").hidden = !report;
    if (!report) {
      $("train-status").textContent = "Not trained yet.";
      return;
    }
    const measured = `${plural(report.examples, "example")} of ${plural(report.classes, "class", "classes")}`;
    $("train-status").textContent = fresh ? `Trained on ${measured}.` : `Last trained${whenText(report.measured_unix)} on ${measured}.`;
    const verdict = $("train-verdict");
    if (report.chosen === null) {
      verdict.textContent = "More examples are needed to compare the two heads: teach more images (at least 10, in "
        + `classes of 2 or more, are held out to measure them). The ${report.head} head is still served.`;
    } else {
      verdict.textContent = report.changed ? `Now serving the ${report.head} head (was ${report.previous}).`
        : `Still serving the ${report.head} head.`;
    }
    verdict.dataset.head = report.head;
    verdict.classList.toggle("unmeasured", report.chosen === null);
    const scores = report.scores || [];
    $("train-scores").replaceChildren(...(scores.length ? [Object.assign(document.createElement("li"), {
      textContent: `Held out (${report.folds}-fold cross-validation): ${scores.map(scoreText).join(", ")}.`,
    })] : []));
    $("train-why").textContent = report.why ? `Why: ${report.why}.` : "";
    // The switch itself bumps the version by one; anything beyond that changed after the measurement.
    $("train-note").hidden = !(ws.version > report.measured_version + 1);
    $("train-note").textContent = "The workspace has changed since (its examples, classes or threshold): train again to measure it as it is now.";
  }

  async function train() {
    const mine = ++seq;
    $("train-status").textContent = "Measuring both heads on your examples…";
    let out;
    try {
      out = await api("POST", wsPath("/adapt"));
    } catch (err) {
      if (mine === seq) {
        const hint = err.status === 409 ? " The workspace changed while it was measured, or is too large: see the message above."
          : err.status === 429 || err.status === 503 ? " The server is busy: try again in a moment." : "";
        $("train-status").textContent = `Not trained.${hint}`;
      }
      throw err; // guarded shows the API's words in the message area
    }
    if (mine === seq) render(out.workspace, true);
    document.dispatchEvent(new Event("fewshot:workspace-changed")); // panel.js: the head moved the held-out answers
  }

  // -- the workspace ------------------------------------------------------------------------------------
  function render(ws, fresh = false) {
    renderThreshold(ws);
    renderTrain(ws, fresh);
  }

  async function refresh() {
    if (!workspace) return;
    const mine = ++seq;
    const ws = await api("GET", wsPath());
    if (mine === seq) render(ws);
  }

  async function change(body) {
    const mine = ++seq; // an older refresh in flight must not draw over this answer
    const ws = await api("PATCH", wsPath(), { body });
    if (mine === seq) render(ws);
    document.dispatchEvent(new Event("fewshot:workspace-changed"));
  }

  document.addEventListener("fewshot:classes-changed", () => { refresh().catch(showError); });
  $("threshold-form").addEventListener("submit", (e) => {
    e.preventDefault();
    guarded(e.submitter, () => change({ threshold: Number($("threshold-value").value) }));
  });
  $("threshold-reset").addEventListener("click", (e) => guarded(e.currentTarget, () => change({ clear_threshold: true })));
  $("train-button").addEventListener("click", (e) => guarded(e.currentTarget, train));
  if (workspace) refresh().catch(showError); // app.js may have opened a stored workspace before this ran
})();
