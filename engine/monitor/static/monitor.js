// The monitor page: listens to /events (server-sent events) and draws.
// Plain JavaScript, no build, no dependency. Every string from NATS goes in as
// textContent, never as HTML. Cards live in a Map; only the current page of
// them is in the DOM, so 200 (or 2,000) sources cost one page of elements.
"use strict";

const PAGE = 24;
const cards = new Map();
let page = 0;
let filter = "";

function el(tag, attrs, ...kids) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const kid of kids) if (kid !== null && kid !== undefined) node.append(kid);
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function num(n) { return n === null || n === undefined ? "–" : String(n); }

function uptime(s) {
  if (s === null || s === undefined) return "–";
  if (s < 120) return `${Math.round(s)} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function spark(name, values) {
  if (values.length === 1) values = [values[0], values[0]];  // one round: a flat line, not nothing
  const w = 180, h = 28, max = Math.max(1, ...values);
  const pts = values.map((v, i) => `${(i / Math.max(1, values.length - 1)) * w},${h - (v / max) * (h - 2) - 1}`);
  const box = svg("svg", { viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none" });
  box.append(svg("polyline", { points: pts.join(" ") }));
  const last = values.length ? values[values.length - 1] : 0;
  return el("div", { class: "spark" + (name.startsWith("rejected") ? " rej" : ""), "data-series": name },
    el("span", {}, name), el("b", {}, String(last)), box);
}

function rows(tbody, items, cells) {
  tbody.replaceChildren(...items.map((it) => el("tr", {}, ...cells(it).map((c) => el("td", {}, String(c))))));
}

function drawOverview(o) {
  const series = o.rates.series;
  document.getElementById("sparks").replaceChildren(...Object.keys(series).map((k) => spark(k, series[k])));
  document.getElementById("p50").textContent = num(o.latency_ms.p50);
  document.getElementById("p99").textContent = num(o.latency_ms.p99);
  const t = o.totals;
  document.getElementById("counter-results").textContent = num(t.results ?? o.results_seen);
  document.getElementById("counter-received").textContent = num(t.received ?? 0);
  document.getElementById("counter-rejected").textContent = num(t.rejected ?? 0);
  document.getElementById("counter-rate-limited").textContent = num(t.rate_limited ?? 0);
  rows(document.querySelector("#engines tbody"), o.engines, (e) => [
    e.id.slice(0, 12), e.worker || "–", e.status || "–", uptime(e.uptime_s),
    e.partitions.length ? e.partitions.join(", ") : "all", e.unacked]);
  rows(document.querySelector("#routes tbody"), Object.entries(o.routes), ([name, r]) => [
    name, r.queue, r.batches, r.mean_size,
    Object.entries(r.sizes).map(([k, v]) => `${k}×${v}`).join(" ")]);
  document.getElementById("glm-calls").textContent = num(o.glm.calls ?? 0);
  document.getElementById("glm-errors").textContent = num(o.glm.errors ?? 0);
  document.getElementById("glm-skipped").textContent = num(o.glm.skipped_total ?? 0);
  document.getElementById("glm-why").textContent =
    Object.entries(o.glm.skipped || {}).map(([k, v]) => `${k} ${v}`).join(", ");
  document.getElementById("summary").textContent =
    `${o.engines.length} engine(s) · ${o.sources} source(s)`;
}

function drawRejections(r) {
  const tbody = document.querySelector("#reasons tbody");
  tbody.replaceChildren(...Object.entries(r.counts).map(([reason, n]) =>
    el("tr", { class: "reason-row", "data-reason": reason },
      el("td", { class: "reason" }, reason), el("td", {}, String(n)))));
  document.getElementById("dlq-last").replaceChildren(...r.last.map((rec) =>
    el("li", { "data-reason": rec.reason },
      el("span", { class: "reason" }, rec.reason), " ",
      el("code", {}, rec.subject || ""), " — ", rec.message || "")));
}

function soundStrip(sound) {
  const w = 120, h = 18, box = svg("svg", { class: "strip", viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none" });
  const step = w / 30;
  sound.forEach(([db, voice], i) => {
    const level = Math.max(0, Math.min(1, (db + 60) / 60));
    box.append(svg("rect", { class: "l", x: i * step, y: h - level * h, width: step - 1, height: level * h }));
    box.append(svg("rect", { class: "v", x: i * step, y: h - 2, width: (step - 1) * voice, height: 2 }));
  });
  return box;
}

function cardNode(c) {
  const pic = c.frame
    ? el("img", { class: "thumb", alt: `latest frame of ${c.name}`, src: `/frame/${encodeURIComponent(c.name)}?v=${c.frame}` })
    : el("div", { class: "nothumb" }, "no frame");
  const badges = el("div", { class: "badges" });
  for (const m of c.missing) badges.append(el("span", { class: "missing" }, `missing ${m}`));
  for (const [why, n] of Object.entries(c.skipped)) badges.append(el("span", {}, `${why} ${n}`));
  for (const [why, n] of Object.entries(c.rejected)) badges.append(el("span", { class: "rej" }, `${why} ${n}`));
  const words = Object.entries(c.words).map(([m, t]) => `${m}: ${t}`).join(" · ");
  const node = el("article", { class: "card", "data-source": c.name, tabindex: "0" },
    el("h3", {}, el("span", {}, c.name), el("small", { class: "results" }, `${c.results} windows`)),
    pic,
    c.sound.length ? soundStrip(c.sound) : null,
    el("div", { class: "answer" }, c.answer ? `“${c.answer}”` : `glm: ${c.glm || "–"}`),
    words ? el("div", { class: "words" }, words) : null,
    c.labels.length ? el("div", { class: "labels" }, c.labels.join(", ")) : null,
    c.last_rejection ? el("div", { class: "words last-rejection" }, c.last_rejection) : null,
    badges);
  node.addEventListener("click", () => openTimeline(c.name));
  return node;
}

function visible() {
  const names = [...cards.keys()].filter((n) => n.includes(filter)).sort();
  const pages = Math.max(1, Math.ceil(names.length / PAGE));
  page = Math.min(page, pages - 1);
  return { names: names.slice(page * PAGE, (page + 1) * PAGE), pages, total: names.length };
}

function drawCards(changed) {
  const { names, pages, total } = visible();
  document.getElementById("page").textContent = `${page + 1} / ${pages}`;
  document.getElementById("source-count").textContent = String(total);
  const grid = document.getElementById("cards");
  const present = new Map([...grid.children].map((n) => [n.dataset.source, n]));
  const wanted = names.map((n) => (changed === null || changed.has(n) || !present.has(n)) ? cardNode(cards.get(n)) : present.get(n));
  if (wanted.length !== grid.children.length || wanted.some((n, i) => n !== grid.children[i])) grid.replaceChildren(...wanted);
}

async function openTimeline(name) {
  const reply = await fetch(`/api/source/${encodeURIComponent(name)}`);
  if (!reply.ok) return;
  const data = await reply.json();
  document.getElementById("timeline-title").textContent = `${name}: last ${data.windows.length} windows`;
  const fmt = (o) => Object.entries(o || {}).map(([k, v]) => `${k} ${v}`).join(", ") || "–";
  rows(document.getElementById("timeline-rows"), data.windows.slice().reverse(), (w) => [
    new Date(w.start_ns / 1e6).toISOString().slice(11, 23), fmt(w.events), w.missing.join(", ") || "–",
    fmt(w.skipped), fmt(w.rejected), w.glm, w.answer || "", num(w.event_to_result_ms)]);
  const dialog = document.getElementById("timeline");
  if (!dialog.open) dialog.showModal();
}

function connect() {
  const conn = document.getElementById("conn");
  const source = new EventSource("/events");
  source.addEventListener("open", () => { conn.textContent = "live"; conn.className = "conn up"; });
  source.addEventListener("error", () => { conn.textContent = "reconnecting…"; conn.className = "conn down"; });
  source.addEventListener("update", (ev) => {
    const u = JSON.parse(ev.data);
    if (u.full) cards.clear();
    for (const c of u.cards) cards.set(c.name, c);
    drawOverview(u.overview);
    drawRejections(u.rejections);
    drawCards(u.full ? null : new Set(u.cards.map((c) => c.name)));
    document.body.dataset.seq = String(u.seq);
  });
}

document.getElementById("filter").addEventListener("input", (e) => { filter = e.target.value; page = 0; drawCards(null); });
document.getElementById("prev").addEventListener("click", () => { page = Math.max(0, page - 1); drawCards(null); });
document.getElementById("next").addEventListener("click", () => { page += 1; drawCards(null); });
connect();
