// The chat page of `alignkit serve`: plain JS, no build step. Streams /v1/chat/completions (server-sent
// events) for the chosen model, and for a second one side by side when "compare with" is set.
"use strict";

const $ = (id) => document.getElementById(id);
const histories = [[], []];  // per pane: [{role, content}]
let busy = false;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(text) { $("error").textContent = text || ""; }

async function loadModels() {
  const r = await fetch("/v1/models", { headers: headers() });
  if (!r.ok) { showError("cannot list models: HTTP " + r.status); return; }
  const data = (await r.json()).data;
  for (const sel of [$("model"), $("compare")]) {
    const keep = sel.value;
    for (const o of [...sel.options]) if (o.value) o.remove();
    for (const m of data) {
      const o = document.createElement("option");
      o.value = m.id; o.textContent = m.id + " (" + m.adapter_kind + ")";
      sel.appendChild(o);
    }
    if (keep && data.some((m) => m.id === keep)) sel.value = keep;
  }
  updatePanes();
}

function updatePanes() {
  $("title-0").textContent = $("model").value;
  const cmp = $("compare").value;
  $("pane-1").hidden = !cmp;
  $("title-1").textContent = cmp;
}

function addMessage(pane, role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("log-" + pane).appendChild(div);
  $("log-" + pane).scrollTop = 1e9;
  return div;
}

// The max tokens field: empty is not sent (the server's default: the context left after the prompt, capped by its
// --max-new-tokens, as vLLM); a number is sent as typed, so a 0 gets the server's 400 on the page (it was
// `parseInt(...) || 64`: a typed 0 went out as 64 without a word).
function maxTokens() {
  const el = $("max-tokens");
  if (el.validity.badInput) throw new Error("max tokens: not a number (leave it empty for the server's default)");
  return el.value.trim() === "" ? undefined : Number(el.value);
}

async function streamReply(pane, model, prompt) {
  const history = histories[pane];
  history.push({ role: "user", content: prompt });
  addMessage(pane, "user", prompt);
  const out = addMessage(pane, "assistant", "");
  out.classList.add("streaming");
  const t0 = performance.now();
  let first = null, tokens = 0, text = "", finish = null;
  try {
    const body = {
      model, messages: history, stream: true, stream_options: { include_usage: true },
      max_tokens: maxTokens(),  // undefined: left out of the JSON
      temperature: parseFloat($("temperature").value) || 0,
    };
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || "HTTP " + r.status);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, cut).trim();
        buf = buf.slice(cut + 2);
        if (!line.startsWith("data:")) continue;
        const payload = line.slice(5).trim();
        if (payload === "[DONE]") continue;
        const msg = JSON.parse(payload);
        if (msg.error) throw new Error(msg.error.message);
        if (msg.usage) tokens = msg.usage.completion_tokens;
        for (const c of msg.choices || []) {
          const piece = c.delta && c.delta.content;
          if (piece) {
            if (first === null) first = performance.now();
            text += piece;
            out.dataset.chunks = String(parseInt(out.dataset.chunks || "0", 10) + 1);  // deltas received
            out.textContent = text;
            $("log-" + pane).scrollTop = 1e9;
          }
          if (c.finish_reason) finish = c.finish_reason;
        }
      }
    }
  } catch (e) {
    out.classList.remove("streaming");
    out.classList.add("failed");
    showError(model + ": " + e.message);
    history.pop();
    return;
  }
  out.classList.remove("streaming");
  out.classList.add("done");
  history.push({ role: "assistant", content: text });
  const total = (performance.now() - t0) / 1000;
  const ttft = first === null ? total : (first - t0) / 1000;
  const rate = tokens / Math.max(total, 1e-6);
  $("stats-" + pane).textContent = `${tokens} tokens · ${rate.toFixed(1)} tokens/s · first token ${(ttft * 1000).toFixed(0)} ms · ` +
    `latency ${(total * 1000).toFixed(0)} ms · finish: ${finish}`;
}

async function send(ev) {
  if (ev) ev.preventDefault();
  const prompt = $("prompt").value;
  if (!prompt.trim() || busy) return;
  busy = true;
  $("send").disabled = true;
  showError("");
  $("prompt").value = "";
  const jobs = [streamReply(0, $("model").value, prompt)];
  if ($("compare").value) jobs.push(streamReply(1, $("compare").value, prompt));
  await Promise.all(jobs);
  busy = false;
  $("send").disabled = false;
  $("prompt").focus();
}

function clearChat() {
  for (const p of [0, 1]) { histories[p] = []; $("log-" + p).innerHTML = ""; $("stats-" + p).textContent = ""; }
  showError("");
}

$("composer").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) send(e); });
$("model").addEventListener("change", () => { clearChat(); updatePanes(); });
$("compare").addEventListener("change", () => { clearChat(); updatePanes(); });
$("clear").addEventListener("click", clearChat);
$("api-key").addEventListener("change", () => { localStorage.setItem("alignkit-api-key", $("api-key").value); loadModels(); });
$("api-key").value = localStorage.getItem("alignkit-api-key") || "";
loadModels();
