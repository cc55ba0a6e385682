// The page of `viclip serve`: upload images, show each model's caption side by side, and the run's report.
// Plain script, no framework and nothing fetched from elsewhere, so the page works offline.
"use strict";

const NAMES = {};  // model -> display name, as GET /v1/models gives them
const $ = (id) => document.getElementById(id);

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function getJSON(url) {
  const response = await fetch(url);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

async function loadModels() {
  const info = await getJSON("/v1/models");
  for (const m of info.models) NAMES[m.model] = m.display;
  $("models").textContent = "Serving " + info.models.map((m) => {
    // Syllable figures sit at the top of a metrics file, word figures in its `word` block (README, protocols).
    const scored = m.test_metrics && (m.test_metrics.cider != null ? m.test_metrics : m.test_metrics.word);
    const cider = scored && scored.cider != null
      ? `, ${m.test_metrics.dataset || "KTVIC"} test CIDEr ${scored.cider.toFixed(3)} (${(scored.protocol && scored.protocol.name) || "syllable"})` : "";
    return `${m.display} (${m.encoder.name} encoder${cider})`;
  }).join(" and ");
  for (const [id, key, limit] of [["beam", "beam_size", "max_beam_size"], ["length", "max_length", "max_length"]]) {
    $(id).value = info.defaults[key];
    $(id).max = info.limits[limit];
  }
}

async function loadSamples() {
  const { samples } = await getJSON("/v1/samples");
  if (!samples.length) return;
  for (const sample of samples) {
    const button = element("button", { type: "button", title: sample.name, class: "sample" },
      element("img", { src: sample.url, alt: sample.name }));
    button.addEventListener("click", async () => {
      const blob = await (await fetch(sample.url)).blob();
      caption([new File([blob], sample.name, { type: blob.type })]);
    });
    $("samples").append(button);
  }
  $("samples").hidden = false;
}

// The comparison report is markdown: headings, paragraphs, pipe tables and its chart's image line are all it
// uses. The service links that image to its chart's endpoint; an image from anywhere else is not shown.
const IMAGE = /^!\[([^\]]*)\]\((\/(?!\/)[^)\s]*)\)$/;

function chart(src, alt) {
  return element("img", { class: "chart", src, alt });
}

function renderMarkdown(markdown, into) {
  const lines = markdown.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i].trim();
    if (!line) continue;
    const image = IMAGE.exec(line);
    if (image) {
      into.append(chart(image[2], image[1]));
    } else if (line.startsWith("![")) {
      continue;
    } else if (line.startsWith("|")) {
      const rows = [];
      while (i < lines.length && lines[i].trim().startsWith("|")) rows.push(lines[i++].trim());
      i--;
      into.append(renderTable(rows));
    } else if (line.startsWith("#")) {
      into.append(element("h3", {}, ...inline(line.replace(/^#+\s*/, ""))));
    } else {
      into.append(element("p", {}, ...inline(line)));
    }
  }
}

function renderTable(rows) {
  const cells = (row) => row.replace(/^\||\|$/g, "").split("|").map((cell) => cell.trim());
  const table = element("table");
  const body = rows.filter((row) => !/^\|[\s:|-]+\|$/.test(row));
  body.forEach((row, n) => {
    const tr = element("tr");
    for (const cell of cells(row)) tr.append(element(n === 0 ? "th" : "td", {}, ...inline(cell)));
    table.append(tr);
  });
  return table;
}

function inline(text) {
  // **bold** and `code`; everything else is text, never HTML.
  return text.split(/(\*\*[^*]+\*\*|`[^`]+`)/).filter(Boolean).map((part) => {
    if (part.startsWith("**")) return element("strong", {}, part.slice(2, -2));
    if (part.startsWith("`")) return element("code", {}, part.slice(1, -1));
    return part;
  });
}

async function loadReport() {
  const report = await getJSON("/v1/report");
  if (!report.markdown && !report.chart) return;
  if (report.markdown) renderMarkdown(report.markdown, $("report-body"));
  // The chart goes where the report's image line puts it; a report without that line still shows it, last.
  if (report.chart && !$("report-body").querySelector("img.chart")) {
    $("report-body").append(chart(report.chart, "The comparison chart"));
  }
  $("report").hidden = false;
}

function seconds(value) {
  return value < 1 ? `${Math.round(value * 1000)} ms` : `${value.toFixed(2)} s`;
}

async function caption(files) {
  files = [...files];
  if (!files.length) return;
  const form = new FormData();
  for (const file of files) form.append("images", file, file.name);
  // Left empty, a setting is the service's default.
  if ($("beam").value) form.append("beam_size", $("beam").value);
  if ($("length").value) form.append("max_length", $("length").value);
  setStatus(`Captioning ${files.length} image${files.length > 1 ? "s" : ""}…`);
  let body;
  try {
    const response = await fetch("/v1/captions", { method: "POST", body: form });
    body = await response.json();
    if (!response.ok) throw new Error(body.error || response.statusText);
  } catch (error) {
    setStatus(`Error: ${error.message}`, true);
    return;
  }
  const timings = body.timings;
  setStatus(`Done in ${seconds(timings.total_s)} (beam ${body.settings.beam_size}).`);
  body.images.forEach((image, n) => {
    const captions = element("div", { class: "captions" });
    for (const [model, text] of Object.entries(image.captions)) {
      const t = timings.models[model];
      captions.append(element("div", { class: `caption ${model}`, "data-model": model },
        element("div", { class: "model" }, NAMES[model] || model),
        element("div", { class: "text", lang: "vi" }, text),
        element("div", { class: "time" },
          `${seconds(t.model_s)} on the model (a batch of ${t.batch_images}), ${seconds(t.queued_s)} queued`)));
    }
    const thumbnail = element("img", { src: URL.createObjectURL(files[n]), alt: image.name });
    $("results").prepend(element("article", { class: "result" }, thumbnail,
      element("div", {}, element("h3", {}, `${image.name} · ${image.width}×${image.height}`), captions)));
  });
}

function setUpUpload() {
  $("files").addEventListener("change", (event) => {
    caption(event.target.files);
    event.target.value = "";
  });
  const drop = $("drop");
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (event) => caption(event.dataTransfer.files));
}

window.addEventListener("DOMContentLoaded", () => {
  setUpUpload();
  for (const load of [loadModels, loadSamples, loadReport]) {
    load().catch((error) => setStatus(`Error: ${error.message}`, true));
  }
});
