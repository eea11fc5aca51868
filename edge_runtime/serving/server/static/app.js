// edge_runtime's page: speak with the server's own API, watch its live figures.
// No libraries, nothing fetched from another origin. Every /v1 call carries the API key, if one is typed.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "edge_runtime.api_key";
const HISTORY = 300;          // memory samples kept for the chart (~5 minutes at one per second)
const POLL_MS = 1000;

const state = { model: null, history: [], lastStats: null, speaking: false, recorder: null, statsFailures: 0,
                pendingVoice: null };
window.edgeRuntime = state;   // for the browser test and for curious users

// ---- API -------------------------------------------------------------------------------------
function authHeaders(extra) {
  const headers = Object.assign({}, extra || {});
  const key = $("api-key").value.trim();
  if (key) headers["Authorization"] = "Bearer " + key;
  return headers;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
    if (body && body.detail) return `${response.status}: ${JSON.stringify(body.detail)}`;
  } catch (e) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = authHeaders(opts.headers);
  const response = await fetch(path, opts);
  if (!response.ok) {
    const text = await errorText(response);
    throw new Error(response.status === 401 ? `${text} (type the server's API key at the top right)` : text);
  }
  return response;
}

// ---- formatting ------------------------------------------------------------------------------
function mib(bytes) {
  if (bytes === null || bytes === undefined) return "–";
  if (bytes === 0) return "0";
  if (bytes >= 1024 ** 3) return (bytes / 1024 ** 3).toFixed(2) + " GiB";
  if (bytes < 1024 ** 2) return (bytes / 1024).toFixed(bytes < 10 * 1024 ? 1 : 0) + " KiB";
  return (bytes / 1024 ** 2).toFixed(bytes >= 100 * 1024 ** 2 ? 0 : 1) + " MiB";
}
const ms = (s) => (s === null || s === undefined ? "–" : (s * 1000).toFixed(0));
const fixed = (x, n) => (x === null || x === undefined ? "–" : Number(x).toFixed(n));

function setStatus(id, text, isError) {
  const el = $(id);
  el.textContent = text;
  el.classList.toggle("error", !!isError);
}

// ---- voices ----------------------------------------------------------------------------------
let voiceLoads = 0;  // refreshes may overlap (an upload, a new API key): only the newest fills the list

async function loadVoices(select) {
  if (select) state.pendingVoice = select;  // kept until a refresh shows it, whichever refresh that is
  const mine = ++voiceLoads;
  const models = await (await api("/v1/models")).json();
  const voices = (await (await api("/v1/voices")).json()).data;
  if (mine !== voiceLoads) return;
  state.model = models.data[0];
  $("model-name").textContent = `${state.model.id} · ${state.model.sample_rate} Hz`;
  const menu = $("voice");
  const keep = state.pendingVoice || menu.value;
  menu.innerHTML = "";
  const speakers = new Set(state.model.voices);
  const groups = [["Built-in", voices.filter((v) => v.type === "builtin")],
                  ["Uploaded", voices.filter((v) => v.type === "uploaded")]];
  for (const [label, list] of groups) {
    if (!list.length) continue;
    const group = document.createElement("optgroup");
    group.label = label;
    for (const v of list) {
      const option = document.createElement("option");
      option.value = v.id;
      option.dataset.type = v.type;
      option.textContent = v.type === "uploaded"
        ? `${v.id.slice(0, 12)}…${v.transcript ? " · " + v.transcript.slice(0, 40) : ""}` : v.id;
      if (v.type === "builtin" && !speakers.has(v.id)) option.textContent += " (default speaker)";
      group.appendChild(option);
    }
    menu.appendChild(group);
  }
  if (keep && [...menu.options].some((o) => o.value === keep)) {
    menu.value = keep;
    if (keep === state.pendingVoice) state.pendingVoice = null;
  }
  $("upload").disabled = $("record").disabled = !state.model.voice_prompt;
}

// ---- speaking --------------------------------------------------------------------------------
function waitUpdate(buffer) {
  return new Promise((resolve, reject) => {
    buffer.addEventListener("updateend", resolve, { once: true });
    buffer.addEventListener("error", () => reject(new Error("the browser could not decode the audio")), { once: true });
  });
}

async function speak() {
  if (state.speaking) return;
  const text = $("text").value;
  if (!text.trim()) { setStatus("speak-status", "type some text first", true); return; }
  const format = $("format").value;
  const speed = parseFloat($("speed").value);
  if (!(speed >= 0.25 && speed <= 4)) { setStatus("speak-status", `speed ${$("speed").value} is out of range; allowed: 0.25 to 4`, true); return; }
  state.speaking = true;
  $("speak").disabled = true;
  $("download").classList.add("hidden");
  const player = $("player");
  const started = performance.now();
  let firstByte = null, bytes = 0;
  const parts = [];
  setStatus("speak-status", "speaking…");
  try {
    const response = await api("/v1/audio/speech", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: state.model ? state.model.id : "tts-1", input: text, voice: $("voice").value,
                             response_format: format, speed: speed }),
    });
    const type = response.headers.get("Content-Type") || "application/octet-stream";
    const reader = response.body.getReader();
    const mse = format === "mp3" && window.MediaSource && MediaSource.isTypeSupported("audio/mpeg");
    if (mse) {  // play while it streams: each chunk goes to the media element as it arrives
      const source = new MediaSource();
      player.src = URL.createObjectURL(source);
      await new Promise((resolve) => source.addEventListener("sourceopen", resolve, { once: true }));
      const buffer = source.addSourceBuffer("audio/mpeg");
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        if (firstByte === null) { firstByte = performance.now() - started; }
        bytes += value.byteLength;
        parts.push(value);
        buffer.appendBuffer(value);
        await waitUpdate(buffer);
        if (player.paused && parts.length === 1) player.play().catch(() => {});
      }
      source.endOfStream();
    } else {    // wav, opus, aac, flac: Chromium's media element cannot take them piecewise; play once whole
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        if (firstByte === null) firstByte = performance.now() - started;
        bytes += value.byteLength;
        parts.push(value);
      }
      player.src = URL.createObjectURL(new Blob(parts, { type }));
      player.play().catch(() => {});
    }
    const link = $("download");
    link.href = URL.createObjectURL(new Blob(parts, { type }));
    link.download = `speech.${format}`;
    link.textContent = `Download speech.${format} (${(bytes / 1024).toFixed(0)} KiB)`;
    link.classList.remove("hidden");
    setStatus("speak-status", `first audio after ${firstByte === null ? "–" : firstByte.toFixed(0)} ms, ` +
              `done in ${(performance.now() - started).toFixed(0)} ms`);
  } catch (e) {
    setStatus("speak-status", String(e.message || e), true);
  } finally {
    state.speaking = false;
    $("speak").disabled = false;
    pollStats();
  }
}

// ---- uploading a voice -----------------------------------------------------------------------
async function uploadBlob(blob, filename) {
  const form = new FormData();
  form.append("file", blob, filename);
  const transcript = $("transcript").value.trim();
  if (transcript) form.append("transcript", transcript);
  setStatus("upload-status", "preparing the voice…");
  try {
    const card = await (await api("/v1/voices", { method: "POST", body: form })).json();
    await loadVoices(card.id);
    setStatus("upload-status", `voice ${card.id.slice(0, 12)}… ready: selected above`);
  } catch (e) {
    setStatus("upload-status", String(e.message || e), true);
  }
}

function upload() {
  const file = $("voice-file").files[0];
  if (!file) { setStatus("upload-status", "choose an audio file first (WAV, FLAC, OGG or MP3)", true); return; }
  uploadBlob(file, file.name);
}

// The browser records webm/opus, which the server does not read: decode it here, send 16-bit WAV.
function wavFrom(audioBuffer) {
  const rate = audioBuffer.sampleRate, n = audioBuffer.length, channels = audioBuffer.numberOfChannels;
  const mono = new Float32Array(n);
  for (let c = 0; c < channels; c++) {
    const data = audioBuffer.getChannelData(c);
    for (let i = 0; i < n; i++) mono[i] += data[i] / channels;
  }
  const view = new DataView(new ArrayBuffer(44 + 2 * n));
  const text = (offset, s) => { for (let i = 0; i < s.length; i++) view.setUint8(offset + i, s.charCodeAt(i)); };
  text(0, "RIFF"); view.setUint32(4, 36 + 2 * n, true); text(8, "WAVE"); text(12, "fmt ");
  view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, rate * 2, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, 2 * n, true);
  for (let i = 0; i < n; i++) view.setInt16(44 + 2 * i, Math.max(-1, Math.min(1, mono[i])) * 32767, true);
  return new Blob([view], { type: "audio/wav" });
}

async function record() {
  const button = $("record");
  if (state.recorder) { state.recorder.stop(); return; }
  if (!navigator.mediaDevices || !window.MediaRecorder) {
    setStatus("upload-status", "this browser cannot record (it needs https or localhost)", true); return;
  }
  let stream;
  try { stream = await navigator.mediaDevices.getUserMedia({ audio: true }); }
  catch (e) { setStatus("upload-status", `no microphone: ${e.message || e}`, true); return; }
  const chunks = [];
  const recorder = new MediaRecorder(stream);
  state.recorder = recorder;
  recorder.ondataavailable = (event) => chunks.push(event.data);
  recorder.onstop = async () => {
    stream.getTracks().forEach((t) => t.stop());
    state.recorder = null;
    button.classList.remove("recording");
    button.textContent = "● Record";
    try {
      const context = new AudioContext();
      const decoded = await context.decodeAudioData(await new Blob(chunks).arrayBuffer());
      context.close();
      await uploadBlob(wavFrom(decoded), "microphone.wav");
    } catch (e) { setStatus("upload-status", `could not read the recording: ${e.message || e}`, true); }
  };
  recorder.start();
  button.classList.add("recording");
  button.textContent = "■ Stop";
  setStatus("upload-status", "recording… click Stop when done (at most 15 s)");
  setTimeout(() => { if (state.recorder === recorder) recorder.stop(); }, 15000);
}

// ---- live panel ------------------------------------------------------------------------------
function drawChart() {
  const canvas = $("mem-chart");
  const dpr = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 560, height = canvas.clientHeight || 160;
  if (canvas.width !== Math.round(width * dpr)) { canvas.width = Math.round(width * dpr); canvas.height = Math.round(height * dpr); }
  const g = canvas.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, width, height);
  const points = state.history;
  canvas.dataset.points = String(points.length);
  const series = [["rss", "--rss"], ["alloc", "--alloc"], ["reserved", "--reserved"]];
  let top = 0;
  for (const p of points) for (const [k] of series) if (p[k] != null) top = Math.max(top, p[k]);
  if (!points.length || !top) return;
  top *= 1.15;
  const left = 58, right = 8, up = 8, down = 18;
  const plotW = width - left - right, plotH = height - up - down;
  const style = getComputedStyle(document.documentElement);
  g.font = "11px system-ui, sans-serif";
  g.fillStyle = "#6b7280";
  g.strokeStyle = "#e3e6eb";
  g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {   // horizontal grid with MiB labels
    const y = up + plotH - (plotH * i) / 4;
    g.beginPath(); g.moveTo(left, y); g.lineTo(width - right, y); g.stroke();
    g.fillText(mib((top * i) / 4), 2, y + 4);
  }
  const t0 = points[0].t, t1 = Math.max(points[points.length - 1].t, t0 + 1);
  g.textAlign = "right";
  g.fillText("now", width - right, height - 4);
  g.textAlign = "left";
  g.fillText(`${Math.round(t1 - t0)} s ago`, left, height - 4);
  const x = (t) => left + ((t - t0) / (t1 - t0)) * plotW;
  const y = (v) => up + plotH - (v / top) * plotH;
  for (const [k, color] of series) {
    g.strokeStyle = style.getPropertyValue(color).trim() || "#2563eb";
    g.lineWidth = 1.8;
    g.beginPath();
    let started = false;
    for (const p of points) {
      if (p[k] == null) continue;
      if (!started) { g.moveTo(x(p.t), y(p[k])); started = true; } else g.lineTo(x(p.t), y(p[k]));
    }
    if (points.length === 1 && started) g.arc(x(points[0].t), y(points[0][k]), 2, 0, 2 * Math.PI);
    g.stroke();
  }
}

function fillTable(id, rows) {
  const body = $(id).querySelector("tbody");
  body.innerHTML = "";
  for (const cells of rows) {
    const tr = document.createElement("tr");
    for (const [text, cls] of cells) {
      const td = document.createElement("td");
      td.textContent = text;
      if (cls) td.className = cls;
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
}

function render(stats) {
  const m = stats.memory;
  state.history.push({ t: stats.time, rss: m.rss_bytes, alloc: m.cuda_allocated_bytes, reserved: m.cuda_reserved_bytes });
  if (state.history.length > HISTORY) state.history.shift();
  drawChart();
  $("mem-now").textContent = `RSS ${mib(m.rss_bytes)} (peak ${mib(m.rss_peak_bytes)})` +
    (m.cuda_allocated_bytes != null ? ` · CUDA ${mib(m.cuda_allocated_bytes)} / ${mib(m.cuda_reserved_bytes)} reserved, peak ${mib(m.cuda_peak_bytes)}` : "");
  const ms_ = stats.model_state;
  const badge = $("model-state");
  const name = stats.draining ? "draining" : ms_ ? ms_.state : "loaded";
  badge.textContent = name + (ms_ && ms_.keep_alive_s ? ` · keep_alive ${ms_.keep_alive_s}s` : "");
  badge.className = "badge " + name;
  const q = stats.queue;
  $("queue-depth").textContent = q.depth;
  $("in-flight").textContent = q.running;
  $("batch-size").textContent = `${q.last_batch_size ?? "–"} / ${q.max_batch ?? "–"}`;
  const recent = stats.requests.recent;
  const last = recent.length ? recent[recent.length - 1] : null;
  $("ttfa").textContent = last && last.time_to_first_audio_s != null ? `${ms(last.time_to_first_audio_s)} ms` : "–";
  $("rtf").textContent = last ? fixed(last.rtf, 3) : "–";
  const vc = stats.voice_cache;
  $("cache").textContent = `${vc.entries} · ${mib(vc.bytes)}`;
  $("cache").title = `hits ${vc.hits}, misses ${vc.misses}, evictions ${vc.evictions}; limits ${vc.max_entries} entries, ${mib(vc.max_bytes)}`;
  $("request-total").textContent = `${stats.requests.requests} total` +
    (stats.requests.rtf_mean != null ? ` · mean RTF ${fixed(stats.requests.rtf_mean, 3)}` : "");
  fillTable("requests", recent.slice(-8).reverse().map((r) => [
    [new Date(r.timestamp * 1000).toLocaleTimeString()], [ms(r.time_to_first_audio_s), "num"], [fixed(r.rtf, 3), "num"],
    [fixed(r.audio_seconds, 2), "num"], [String(r.batch_size), "num"], [r.error ? "error: " + r.error : r.voice_cache]]));
  const p = stats.placement;
  const sits = [];
  if (p.resident_bytes) sits.push(`${mib(p.resident_bytes)} resident on the GPU`);
  if (p.streamed_bytes) sits.push(`${mib(p.streamed_bytes)} streamed from ${p.target}`);
  if (p.cpu_bytes) sits.push(`${mib(p.cpu_bytes)} on the CPU`);
  $("backend").textContent = `backend ${p.backend || "resident"} · ${stats.device}` +
    (p.state ? ` · ${p.state}` : "") + (sits.length ? " · " + sits.join(", ") : "");
  const cuda = m.cuda_allocated_bytes != null;
  for (const el of document.querySelectorAll(".legend .cuda")) el.classList.toggle("hidden", !cuda);
  fillTable("components", stats.components.map((c) => [
    [c.component + (c.submodel ? ` (${c.submodel})` : "")], [String(c.blocks), "num"], [mib(c.bytes), "num"],
    [c.where], [c.precision]]));
}

async function pollStats() {
  try {
    const stats = await (await api("/v1/stats")).json();
    state.lastStats = stats;
    state.statsFailures = 0;
    render(stats);
    setStatus("stats-status", "");
  } catch (e) {
    state.statsFailures += 1;
    setStatus("stats-status", `live figures unavailable: ${e.message || e}`, true);
  }
}

// ---- start -----------------------------------------------------------------------------------
async function start() {
  const key = $("api-key");
  key.value = localStorage.getItem(KEY_STORE) || "";
  key.addEventListener("change", () => {
    localStorage.setItem(KEY_STORE, key.value.trim());
    init();
  });
  $("speak").addEventListener("click", speak);
  $("upload").addEventListener("click", upload);
  $("record").addEventListener("click", record);
  $("text").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) speak(); });
  window.addEventListener("resize", drawChart);
  setInterval(pollStats, POLL_MS);
  await init();
}

async function init() {
  try {
    await loadVoices();
    setStatus("speak-status", "");
    document.body.dataset.ready = "1";
  } catch (e) {
    setStatus("speak-status", String(e.message || e), true);
  }
  pollStats();
}

start();
