// "Under the hood" panel: what the workspace's model knows (GET /insight: held-out accuracy per
// class, confusion matrix, most confused pairs) and which parts of a classified image moved the
// answer (POST /occlusion). Loaded after app.js and uses its helpers ($, api, wsPath, showError,
// workspace); app.js announces changes with the events "fewshot:classes-changed" and
// "fewshot:classified", threshold.js (a threshold set, the Train step) with "fewshot:workspace-changed".
"use strict";

(() => {
  let insightSeq = 0; // only the newest answer is drawn when refreshes overlap
  let occlusionSeq = 0;

  const el = (tag, props = {}, ...children) => {
    const node = Object.assign(document.createElement(tag), props);
    node.append(...children);
    return node;
  };
  const pct = (x) => `${(100 * x).toFixed(0)}%`;

  // -- held-out accuracy, confusion, pairs --------------------------------------------------------
  async function refreshInsight() {
    if (!workspace) return;
    const seq = ++insightSeq;
    const data = await api("GET", wsPath("/insight"));
    if (seq !== insightSeq) return;
    renderInsight(data);
  }

  function renderInsight(data) {
    const panel = $("insight");
    panel.dataset.version = data.version;
    $("insight-summary").textContent = data.accuracy === null
      ? ""
      : `(${data.classes.reduce((n, c) => n + c.correct, 0)} of ${data.evaluated} held-out examples recognised, ${pct(data.accuracy)})`;
    $("insight-method").textContent = data.method === "leave-one-out"
      ? "Each stored example is classified by this workspace's rule with itself left out of its class."
      : `The workspace's probe is refitted on ${data.method} folds; each example is classified by the fit without it.`;
    $("insight-notes").replaceChildren(...data.notes.map((n) => el("li", { textContent: n })));
    $("insight-body").hidden = data.classes.length === 0;
    $("insight-classes").replaceChildren(...data.classes.map(classBar));
    $("insight-pairs").replaceChildren(...(data.pairs.length
      ? data.pairs.map((p) => el("li", { textContent: p.hint }))
      : [el("li", { className: "muted", textContent: data.evaluated ? "No class was mistaken for another." : "Nothing measured yet." })]));
    renderMatrix(data);
  }

  function classBar(c) {
    const measured = c.accuracy !== null;
    const bar = el("span", { className: "bar" });
    bar.setAttribute("role", "meter");
    bar.setAttribute("aria-valuemin", "0");
    bar.setAttribute("aria-valuemax", "100");
    bar.setAttribute("aria-label", `${c.label} held-out accuracy`);
    if (measured) {
      bar.setAttribute("aria-valuenow", (100 * c.accuracy).toFixed(0));
      bar.append(el("span", { style: `width: ${pct(c.accuracy)}` }));
    }
    const value = el("span", { className: "bar-value", textContent: measured ? `${c.correct}/${c.evaluated}` : "n/a" });
    const li = el("li", {}, el("span", { className: "bar-label", textContent: c.label, title: c.label }), bar, value);
    li.dataset.classId = c.class_id;
    const note = c.note || (c.rejected ? `${c.rejected} of ${c.evaluated} would be answered "unknown"` : "");
    if (note) li.append(el("span", { className: "bar-note muted", textContent: note }));
    li.classList.toggle("unmeasured", !measured);
    return li;
  }

  // Rows: true class; columns: the answer. Cell colour: share of the row's examples.
  function renderMatrix(data) {
    const n = data.classes.length;
    const head = el("tr", {}, el("th", { scope: "col", textContent: "true \\ answer" }),
      ...data.classes.map((c, j) => el("th", { scope: "col", textContent: String(j + 1), title: c.label })));
    const rows = data.classes.map((c, i) => {
      const total = data.confusion[i].reduce((a, b) => a + b, 0);
      const cells = data.confusion[i].map((count, j) => {
        const td = el("td", { textContent: count ? String(count) : "", title: `${c.label} answered as ${data.classes[j].label}: ${count}` });
        const share = total ? count / total : 0;
        td.className = i === j ? "diag" : count ? "miss" : "";
        td.style.setProperty("--share", share.toFixed(3));
        return td;
      });
      return el("tr", {}, el("th", { scope: "row", textContent: `${i + 1} ${c.label}`, title: c.label }), ...cells);
    });
    const table = $("insight-matrix");
    table.replaceChildren(el("caption", { className: "visually-hidden", textContent: `Confusion matrix of ${n} classes: rows are the true class, columns the answer` }),
      el("thead", {}, head), el("tbody", {}, ...rows));
  }

  // -- occlusion map --------------------------------------------------------------------------------
  async function showOcclusion(file) {
    const seq = ++occlusionSeq;
    $("occlusion").hidden = true;
    const form = new FormData();
    form.append("image", file, file.name || "snapshot.png");
    const out = await api("POST", wsPath("/occlusion"), { body: form });
    if (seq !== occlusionSeq) return;
    await drawOcclusion(out);
    $("occlusion").hidden = false;
  }

  async function drawOcclusion(out) {
    const img = new Image();
    img.src = `data:image/png;base64,${out.input_png_base64}`;
    await img.decode();
    const canvas = $("occlusion-canvas");
    const side = Math.max(168, out.input_size);
    canvas.width = canvas.height = side;
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = out.input_size >= 64; // keep small character inputs crisp
    ctx.drawImage(img, 0, 0, side, side);
    const peak = Math.max(...out.drop.flat().map(Math.abs));
    const cell = side / out.cells;
    out.drop.forEach((row, r) => row.forEach((v, c) => {
      if (!peak || !v) return;
      const a = (0.65 * Math.abs(v)) / peak;
      ctx.fillStyle = v > 0 ? `rgba(220, 38, 38, ${a})` : `rgba(37, 99, 235, ${a})`;
      ctx.fillRect(c * cell, r * cell, cell, cell);
    }));
    canvas.dataset.cells = out.cells;
    canvas.dataset.classId = out.class_id;
    canvas.setAttribute("aria-label", `occlusion map for "${out.label}"`);
    $("occlusion-caption").textContent = peak
      ? `Red: covering this part lowers "${out.label}" against the runner-up most; blue: covering it makes "${out.label}" stronger.`
      : `Covering any one part leaves "${out.label}" as strong as before.`;
  }

  document.addEventListener("fewshot:classes-changed", () => { refreshInsight().catch(showError); });
  // threshold.js: the threshold or the served head changed, and with it the held-out answers.
  document.addEventListener("fewshot:workspace-changed", () => { refreshInsight().catch(showError); });
  document.addEventListener("fewshot:classified", (e) => { showOcclusion(e.detail.file).catch(showError); });
  // app.js runs first and may already have opened a stored workspace (a page reload) and announced
  // it before these listeners existed: draw the panel for the state as it is now.
  if (workspace) refreshInsight().catch(showError);
})();
