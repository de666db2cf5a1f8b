// Live overview: draws the snapshot the page was served with, then polls its JSON and redraws.
// Charts are inline SVG built here; nothing is loaded from anywhere but this origin.
(function () {
  "use strict";
  const root = document.getElementById("cao-overview");
  const url = root.dataset.url;
  const pollMs = Number(root.dataset.pollMs) || 1500;
  const SVG = "http://www.w3.org/2000/svg";
  const connection = document.getElementById("ov-connection");

  // --- Small DOM helpers -------------------------------------------------------

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function number(value) {
    return value === null || value === undefined ? "–" : Number(value).toLocaleString("en-US");
  }

  function percent(fraction) {
    return (Math.round(fraction * 1000) / 10).toString() + " %";
  }

  // A bar for "used / limit": the fill is the share, capped at the track.
  function bar(used, limit, kind) {
    const wrap = el("div", { class: "ov-meter ov-meter-" + kind });
    const track = el("div", { class: "ov-track" });
    const fill = el("div", { class: "ov-fill" });
    const share = limit ? Math.min(1, used / limit) : 0;
    fill.style.width = (share * 100).toFixed(1) + "%";
    if (limit && used >= limit) fill.classList.add("ov-full");
    else if (share >= 0.8) fill.classList.add("ov-high");
    track.appendChild(fill);
    track.setAttribute("role", "meter");
    track.setAttribute("aria-valuemin", "0");
    track.setAttribute("aria-valuenow", String(used));
    if (limit) track.setAttribute("aria-valuemax", String(limit));
    wrap.appendChild(track);
    wrap.appendChild(el("span", { class: "ov-figure" }, number(used) + " / " + number(limit)));
    return wrap;
  }

  function budget(value, kind) {
    if (value === null) return el("span", { class: "ov-unavailable" }, "unavailable");
    // No budget, nothing to fill: the count alone, quietly.
    if (!value.limit) return el("span", { class: "ov-figure ov-quiet" }, number(value.used) + " · no limit");
    return bar(value.used, value.limit, kind);
  }

  // --- Services and queues --------------------------------------------------------

  function serviceCells(service) {
    const cells = [];
    const name = el("th", { scope: "row", class: "ov-name" }, service.name);
    if (!service.enabled) name.appendChild(el("span", { class: "ov-quiet" }, " (disabled)"));
    cells.push(name);
    const slots = el("td", { class: "ov-slots" });
    if (service.in_use === null) slots.appendChild(el("span", { class: "ov-unavailable" }, "unavailable"));
    else slots.appendChild(bar(service.in_use, service.limit, "slots"));
    cells.push(slots);
    const waiting = el("td", { class: "ov-waiting" }, number(service.waiting));
    if (service.waiting) waiting.appendChild(el("span", { class: "ov-quiet" }, " (oldest " + service.oldest_wait_s.toFixed(1) + " s)"));
    cells.push(waiting);
    const rpm = el("td", { class: "ov-rpm" });
    rpm.appendChild(budget(service.requests_per_minute, "rpm"));
    cells.push(rpm);
    const tpm = el("td", { class: "ov-tpm" });
    tpm.appendChild(budget(service.tokens_per_minute, "tpm"));
    cells.push(tpm);
    const state = el("td", { class: "ov-state" });
    state.appendChild(el("span", { class: "ov-badge ov-state-" + service.state, "data-state": service.state }, service.state_text));
    cells.push(state);
    cells.push(el("td", { class: "ov-num ov-calls" }, number(service.calls_5m)));
    const failures = el("td", { class: "ov-num ov-failures" }, number(service.failures_5m));
    if (service.failures_5m) {
      failures.classList.add("ov-bad");
      failures.appendChild(el("span", { class: "ov-quiet" }, " (" + percent(service.failures_5m / service.calls_5m) + ")"));
    }
    cells.push(failures);
    cells.push(el("td", { class: "ov-num ov-p95" }, service.p95_ms === null ? "–" : number(Math.round(service.p95_ms)) + " ms"));
    return cells;
  }

  // Rows are kept (keyed by name) and their cells replaced, so a row a person is reading stays put.
  function syncRows(tbody, items, key, cellsOf) {
    const existing = new Map([...tbody.children].map((row) => [row.dataset[key], row]));
    items.forEach((item, index) => {
      let row = existing.get(item.name);
      if (!row) {
        row = el("tr");
        row.dataset[key] = item.name;
      }
      existing.delete(item.name);
      row.replaceChildren(...cellsOf(item));
      if (tbody.children[index] !== row) tbody.insertBefore(row, tbody.children[index] || null);
    });
    existing.forEach((row) => row.remove());
  }

  function queueCells(queue) {
    const unavailable = queue.ready === null;
    return [
      el("th", { scope: "row", class: "ov-name" }, queue.name),
      el("td", { class: "ov-num ov-ready" + (unavailable ? " ov-unavailable" : "") }, unavailable ? "unavailable" : number(queue.ready)),
      el("td", { class: "ov-num ov-delayed" + (unavailable ? " ov-unavailable" : "") }, unavailable ? "unavailable" : number(queue.delayed)),
      el("td", { class: "ov-queue-services" }, queue.services.join(", ") || "no service"),
    ];
  }

  // --- Charts ------------------------------------------------------------------------

  const W = 600, H = 190, LEFT = 50, RIGHT = 8, TOP = 10, BOTTOM = 28;
  const PLOT_W = W - LEFT - RIGHT, PLOT_H = H - TOP - BOTTOM;

  // The top of a count axis: even, so its middle line is a whole number too.
  function niceMax(value) {
    if (value <= 2) return 2;
    const step = Math.pow(10, Math.floor(Math.log10(value)));
    for (const m of [2, 4, 6, 8, 10]) if (m * step >= value) return m * step;
    return 10 * step;
  }

  function clock(iso) {
    return new Date(iso).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  function axes(chart, minutes, yMax, label) {
    for (const fraction of [0, 0.5, 1]) {
      const y = TOP + PLOT_H * (1 - fraction);
      chart.appendChild(svg("line", { class: "ov-grid", x1: LEFT, x2: W - RIGHT, y1: y, y2: y }));
      chart.appendChild(svg("text", { class: "ov-axis", x: LEFT - 6, y: y + 4, "text-anchor": "end" }, label(yMax * fraction)));
    }
    const n = minutes.length;
    for (const [index, anchor] of [[0, "start"], [Math.floor(n / 2), "middle"], [n - 1, "end"]]) {
      const x = LEFT + (PLOT_W / n) * (index + (anchor === "start" ? 0 : anchor === "end" ? 1 : 0.5));
      chart.appendChild(svg("text", { class: "ov-axis", x: x, y: H - 8, "text-anchor": anchor }, clock(minutes[index].minute)));
    }
  }

  function jobsChart(chart, jobs) {
    const minutes = jobs.minutes;
    const n = minutes.length;
    const slot = PLOT_W / n;
    const yMax = niceMax(Math.max(1, ...minutes.map((m) => Math.max(m.created, m.completed + m.failed))));
    const y = (value) => TOP + PLOT_H * (1 - value / yMax);
    const parts = [];
    axes({ appendChild: (node) => parts.push(node) }, minutes, yMax, (v) => String(Math.round(v)));
    minutes.forEach((m, i) => {
      const x = LEFT + slot * i + slot * 0.12;
      const width = slot * 0.76;
      const group = svg("g", { class: "ov-minute", "data-minute": m.minute, "data-created": m.created, "data-completed": m.completed, "data-failed": m.failed });
      group.appendChild(svg("title", {}, clock(m.minute) + ": " + m.completed + " completed, " + m.failed + " failed, " + m.created + " created"));
      // A transparent column, so the tooltip shows over empty minutes too.
      group.appendChild(svg("rect", { class: "ov-hit", x: LEFT + slot * i, y: TOP, width: slot, height: PLOT_H }));
      if (m.completed) group.appendChild(svg("rect", { class: "ov-completed", x: x, width: width, y: y(m.completed), height: y(0) - y(m.completed) }));
      if (m.failed) group.appendChild(svg("rect", { class: "ov-failed", x: x, width: width, y: y(m.completed + m.failed), height: y(m.completed) - y(m.completed + m.failed) }));
      // Jobs created: a tick across the minute's column, so it reads against the bar without hiding it.
      if (m.created) group.appendChild(svg("line", { class: "ov-created", x1: x - slot * 0.08, x2: x + width + slot * 0.08, y1: y(m.created), y2: y(m.created) }));
      parts.push(group);
    });
    chart.replaceChildren(...parts);
    document.getElementById("ov-jobs-total").textContent =
      "· last hour: " + number(jobs.completed) + " completed, " + number(jobs.failed) + " failed, " + number(jobs.created) + " created";
  }

  function failureChart(chart, jobs) {
    const minutes = jobs.minutes;
    const n = minutes.length;
    const slot = PLOT_W / n;
    const y = (fraction) => TOP + PLOT_H * (1 - fraction);
    const parts = [];
    axes({ appendChild: (node) => parts.push(node) }, minutes, 1, (v) => Math.round(v * 100) + " %");
    minutes.forEach((m, i) => {
      const ended = m.completed + m.failed;
      const rate = ended ? m.failed / ended : null;
      const group = svg("g", { class: "ov-minute", "data-minute": m.minute, "data-rate": rate === null ? "" : rate.toFixed(4) });
      group.appendChild(svg("title", {}, clock(m.minute) + ": " + (rate === null ? "no job ended" : percent(rate) + " (" + m.failed + " of " + ended + ")")));
      group.appendChild(svg("rect", { class: "ov-hit", x: LEFT + slot * i, y: TOP, width: slot, height: PLOT_H }));
      if (rate !== null) {
        // A minute where jobs ended but none failed still shows: a thin line at 0 %.
        const top = Math.min(y(rate), y(0) - 1.5);
        group.appendChild(svg("rect", { class: rate ? "ov-failed" : "ov-zero", x: LEFT + slot * i + slot * 0.12, width: slot * 0.76, y: top, height: y(0) - top }));
      }
      parts.push(group);
    });
    chart.replaceChildren(...parts);
    const ended = jobs.completed + jobs.failed;
    document.getElementById("ov-failure-total").textContent = jobs.failure_rate === null
      ? "· no job ended in the last hour"
      : "· last hour: " + percent(jobs.failure_rate) + " (" + number(jobs.failed) + " of " + number(ended) + ")";
  }

  // --- Drawing and polling ----------------------------------------------------------------

  function draw(snapshot) {
    syncRows(document.getElementById("ov-services"), snapshot.services, "service", serviceCells);
    syncRows(document.getElementById("ov-queues"), snapshot.queues, "queue", queueCells);
    jobsChart(document.getElementById("ov-jobs-chart"), snapshot.jobs);
    failureChart(document.getElementById("ov-failure-chart"), snapshot.jobs);
    const updated = document.getElementById("ov-updated");
    updated.dateTime = snapshot.generated_at;
    updated.textContent = new Date(snapshot.generated_at).toLocaleTimeString();
    root.dataset.generatedAt = snapshot.generated_at;
  }

  function setConnection(state, text) {
    connection.dataset.state = state;
    connection.textContent = text;
  }

  let stopped = false;

  async function poll() {
    const started = Date.now();
    if (!document.hidden) {
      try {
        const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
        if (response.status === 401 || response.status === 403) {
          // The session ended or lost its permissions: polling again will not help.
          stopped = true;
          setConnection("refused", "stopped: log in again to see live figures");
          return;
        }
        if (!response.ok) throw new Error("HTTP " + response.status);
        draw(await response.json());
        setConnection("live", "live");
      } catch (error) {
        // Keep the last figures on screen, marked as such, and keep trying.
        setConnection("stale", "not updating (" + error.message + "), retrying");
      }
    }
    if (!stopped) setTimeout(poll, Math.max(0, pollMs - (Date.now() - started)));
  }

  draw(JSON.parse(document.getElementById("ov-initial").textContent));
  // A hidden tab skips its polls (no load for nobody) and catches up within one period when shown.
  setTimeout(poll, pollMs);
})();
