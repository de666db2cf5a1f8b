// Job page: the work behind the timeline. The input, each step's output and the error of each failed attempt
// (collapsible, pretty-printed JSON), the attempts' waterfall, what holds a waiting step, the webhook deliveries
// and the resume command. Drawn from the data the page came with (#job-data), then from /jobs/<id>/data,
// fetched again (debounced) when job_detail.js reports an event this page has not drawn yet.
// Everything from the job is set as text: outputs and errors are untrusted.
(function () {
  "use strict";
  const root = document.getElementById("job");
  const dataUrl = root.dataset.dataUrl;
  const DEBOUNCE_MS = 150;
  const TICK_MS = 1000;
  const $ = (id) => document.getElementById(id);

  // --- Small helpers -------------------------------------------------------------

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function pretty(value) { return JSON.stringify(value, null, 2); }

  function duration(ms) {
    if (ms < 1000) return Math.round(ms) + " ms";
    if (ms < 60000) return (ms / 1000).toFixed(ms < 10000 ? 2 : 1) + " s";
    return Math.floor(ms / 60000) + " min " + Math.round((ms % 60000) / 1000) + " s";
  }

  // In UTC, as the page's header gives the job's creation.
  function clock(iso) {
    return iso ? new Date(iso).toISOString().slice(11, 19) + " UTC" : "";
  }

  // A <details> keyed within its parent: redraws keep it (open or not) and touch its text only when it changed.
  function jsonDetails(parent, key, summary, value, kind) {
    let node = parent.querySelector(`:scope > details[data-key="${key}"]`);
    if (!node) {
      node = el("details", { class: "json " + kind, "data-key": key });
      node.append(el("summary"), el("pre"));
    }
    node.querySelector("summary").textContent = summary;
    const text = pretty(value);
    const pre = node.querySelector("pre");
    if (pre.textContent !== text) pre.textContent = text;
    return node;
  }

  // --- Steps: what holds a waiting one, outputs, errors ------------------------------------

  function drawSteps(data) {
    for (const step of data.steps) {
      const box = root.querySelector(`.step-work[data-index="${step.index}"]`);
      if (!box) continue;
      const parts = [];
      const held = data.held_by;
      if (held && held.step_index === step.index) {
        const line = el("p", { class: "held-by", "data-limit": held.limit || "" }, held.text);
        const since = "since " + clock(held.since) + (held.until ? ", until " + clock(held.until) : "");
        line.append(el("span", { class: "muted" }, " (" + since + ")"));
        parts.push(line);
      }
      if (step.output !== null && step.output !== undefined) {
        parts.push(jsonDetails(box, "output", "output", step.output, "output"));
      }
      for (const attempt of step.attempts) {
        if (!attempt.error) continue;
        const what = [attempt.error.code, attempt.http_status].filter((part) => part).join(", ");
        const summary = "attempt " + attempt.attempt + " " + attempt.outcome.toLowerCase() + (what ? ": " + what : "");
        parts.push(jsonDetails(box, "error-" + attempt.token, summary, attempt.error, "attempt-error"));
      }
      box.replaceChildren(...parts);
    }
  }

  // --- The waterfall: one row per step, every segment on one time axis ----------------------

  function place(bar, start, end, span) {
    const left = (100 * start) / span;
    const width = (100 * (end - start)) / span;
    // A few pixels wide at least, and never past the axis's end.
    bar.style.left = `min(${left.toFixed(3)}%, calc(100% - 3px))`;
    bar.style.width = `max(${width.toFixed(3)}%, 3px)`;
  }

  // The bars and their segments, kept for layoutWaterfall: the clock moves them without rebuilding them,
  // so a tooltip being read stays up.
  let drawnBars = [];

  function drawWaterfall(data) {
    const waterfall = data.waterfall;
    drawnBars = [];
    if (waterfall.segments.length === 0) {
      $("waterfall").replaceChildren(el("p", { class: "muted wf-empty" }, "No step has waited or been called yet."));
      return;
    }
    const rows = data.steps.map((step) => {
      const row = el("div", { class: "wf-row", "data-index": step.index });
      const track = el("div", { class: "wf-track" });
      for (const segment of waterfall.segments) {
        if (segment.step_index !== step.index) continue;
        const kind = segment.kind === "call" ? "wf-call wf-" + segment.outcome.toLowerCase() : "wf-" + segment.kind;
        const bar = el("div", {
          class: "wf-bar " + kind + (segment.ongoing ? " wf-ongoing" : ""), role: "img",
          "data-kind": segment.kind, "data-step": step.index, "data-start-ms": segment.start_ms,
        });
        if (segment.attempt !== undefined && segment.attempt !== null) bar.dataset.attempt = segment.attempt;
        drawnBars.push([bar, segment]);
        track.append(bar);
      }
      row.append(el("span", { class: "wf-label" }, step.index + 1 + ". " + step.service), track);
      return row;
    });
    const ticks = el("div", { class: "wf-ticks" });
    for (let n = 0; n < 5; n++) ticks.append(el("span", { class: "wf-tick" }));
    const axis = el("div", { class: "wf-row wf-axis" });
    axis.append(el("span", { class: "wf-label muted" }, "since created"), ticks);
    $("waterfall").replaceChildren(...rows, axis);
  }

  // Places the bars and ticks; ``elapsedMs`` since the data was read extends what is still going on.
  function layoutWaterfall(data, elapsedMs) {
    const active = data.status === "PENDING" || data.status === "RUNNING";
    const endOf = (segment) => segment.end_ms + (segment.ongoing ? elapsedMs : 0);
    const span = Math.max(1, data.waterfall.span_ms + (active ? elapsedMs : 0), ...data.waterfall.segments.map(endOf));
    for (const [bar, segment] of drawnBars) {
      const end = endOf(segment);
      const title = segment.label + "\n" + duration(end - segment.start_ms) + (segment.ongoing ? " so far" : "") +
        " · from +" + duration(segment.start_ms) + " to +" + duration(end);
      bar.dataset.endMs = String(end);
      bar.title = title;
      bar.setAttribute("aria-label", title);
      place(bar, segment.start_ms, end, span);
    }
    $("waterfall").querySelectorAll(".wf-tick").forEach((tick, n) => {
      tick.textContent = n ? "+" + duration((span * n) / 4) : "0";
      tick.style.left = 25 * n + "%";
    });
  }

  // --- Deliveries and the resume command ---------------------------------------------------

  function drawDeliveries(data) {
    $("deliveries-section").hidden = !data.webhook_url && data.deliveries.length === 0;
    $("webhook-url").textContent = data.webhook_url;
    $("delivery-log-link").hidden = !data.delivery_log_url;
    if (data.delivery_log_url) $("delivery-log").href = data.delivery_log_url;
    $("deliveries").replaceChildren(...data.deliveries.map((delivery) => {
      const row = el("tr", { "data-seq": delivery.seq, "data-state": delivery.state });
      const id = el("td");
      const code = el("code", {}, delivery.webhook_id);
      if (delivery.admin_url) {
        const link = el("a", { href: delivery.admin_url });
        link.append(code);
        id.append(link);
      } else {
        id.append(code);
      }
      const state = el("td");
      state.append(el("span", { class: "badge delivery-" + delivery.state.toLowerCase() }, delivery.state));
      row.append(
        id,
        el("td", { class: "event-type" }, delivery.event_type),
        state,
        el("td", { class: "delivery-attempts" }, delivery.attempts),
        el("td", { class: "status-code" }, delivery.last_status_code === null ? "–" : delivery.last_status_code),
        el("td", { class: "latency" }, delivery.last_latency_ms === null ? "–" : delivery.last_latency_ms + " ms"),
        el("td", { class: "next-try" }, delivery.next_attempt_at ? clock(delivery.next_attempt_at) : "–"),
        el("td", { class: "last-error" }, delivery.last_error),
      );
      return row;
    }));
  }

  function drawResume(data) {
    const resume = data.resume;
    $("resume-command").hidden = !resume;
    $("resume-curl").textContent = resume ? resume.curl : "";
    $("resume-force-note").hidden = !(resume && resume.force);
    if (!resume) $("copy-outcome").textContent = "";
  }

  async function copyResume() {
    const code = $("resume-curl");
    try {
      if (!navigator.clipboard) throw new Error("no clipboard here");
      await navigator.clipboard.writeText(code.textContent);
      $("copy-outcome").textContent = "Copied.";
    } catch (error) {
      // No clipboard (an insecure origin, a refused permission): select the command to copy by hand.
      const range = document.createRange();
      range.selectNodeContents(code);
      const selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      $("copy-outcome").textContent = "Selected: press Ctrl+C to copy.";
    }
  }

  // --- Drawing, refreshing, and the clock of what is still going on --------------------------

  let current = null;
  let receivedAt = 0;
  let ticker = null;

  function tick() { layoutWaterfall(current, Date.now() - receivedAt); }

  function draw(data) {
    // A slower, older answer never overwrites a newer one.
    if (current && data.last_event_seq < current.last_event_seq) return;
    current = data;
    receivedAt = Date.now();
    $("input-json").textContent = pretty(data.input_data);
    drawSteps(data);
    drawWaterfall(data);
    layoutWaterfall(data, 0);
    drawDeliveries(data);
    drawResume(data);
    // Bars of what is still going on grow by the page's clock between refreshes.
    const ongoing = data.waterfall.segments.some((segment) => segment.ongoing);
    if (ongoing && ticker === null) ticker = window.setInterval(tick, TICK_MS);
    if (!ongoing && ticker !== null) { window.clearInterval(ticker); ticker = null; }
    root.dataset.renderedSeq = String(data.last_event_seq);
  }

  let heard = 0;  // the highest seq job_detail.js reported
  let timer = null;
  let fetching = false;
  let stopped = false;
  let misses = 0;

  function schedule(delay) {
    if (stopped || timer !== null) return;
    timer = window.setTimeout(refresh, delay);
  }

  async function refresh() {
    timer = null;
    if (fetching) return;  // the answer in flight schedules the next one
    fetching = true;
    try {
      const response = await fetch(dataUrl, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (response.status === 401 || response.status === 403) {
        stopped = true;
        $("work-state").textContent = "· not updating: log in again";
        return;
      }
      if (!response.ok) throw new Error("HTTP " + response.status);
      draw(await response.json());
      $("work-state").textContent = "";
    } catch (error) {
      $("work-state").textContent = "· not updating (" + error.message + "), retrying";
    } finally {
      fetching = false;
    }
    // An event heard but not in the answer yet (or a failed fetch): ask again, more slowly each time.
    if (heard > current.last_event_seq) {
      misses += 1;
      schedule(Math.min(5000, DEBOUNCE_MS * 2 ** misses));
    } else {
      misses = 0;
    }
  }

  root.addEventListener("job:event", (event) => {
    const seq = event.detail.type === "WS_CONNECTED" ? event.detail.last_seq : event.detail.seq;
    if (typeof seq !== "number" || seq <= heard) return;
    heard = seq;
    if (seq > current.last_event_seq) schedule(DEBOUNCE_MS);
  });
  $("copy-resume").addEventListener("click", copyResume);
  draw(JSON.parse($("job-data").textContent));
  heard = current.last_event_seq;
})();
