// Job page: follow the job over its WebSocket and update the step timeline.
// Reconnects by itself with ?after=<last seq seen>, so no step is missed or shown twice.
(function () {
  "use strict";
  const root = document.getElementById("job");
  const jobId = root.dataset.jobId;
  let lastSeq = Number(root.dataset.lastSeq);
  let retryable = root.dataset.retryable === "true";
  let attempt = 0;
  const TERMINAL = ["COMPLETED", "CANCELLED"];

  const $ = (id) => document.getElementById(id);
  const step = (index) => root.querySelector(`.step[data-index="${index}"]`);

  function setConnection(text) { $("connection").textContent = text; }

  function setStatus(status) {
    root.dataset.status = status;
    const badge = $("job-status");
    badge.textContent = status;
    badge.className = "badge status-" + status.toLowerCase();
    if ($("cancel")) $("cancel").hidden = TERMINAL.includes(status);
    if (status !== "FAILED") $("error-box").hidden = true;
  }

  function setStep(index, state, fields) {
    const row = step(index);
    if (!row) return;
    row.dataset.state = state;
    const badge = row.querySelector(".state");
    badge.textContent = state;
    badge.className = "state badge state-" + state;
    if (fields && fields.duration !== undefined) row.querySelector(".duration").textContent = fields.duration + " ms";
    if (fields && fields.attempts !== undefined) {
      row.querySelector(".attempts").textContent = fields.attempts + (fields.attempts === 1 ? " attempt" : " attempts");
    }
  }

  function logEvent(event) {
    const item = document.createElement("li");
    item.dataset.seq = event.seq;
    const seq = document.createElement("code");
    seq.textContent = "#" + event.seq;
    const type = document.createElement("b");
    type.textContent = event.type;
    item.append(seq, " ", type, " ", event.message || "");
    $("events").append(item);
  }

  function apply(event) {
    switch (event.type) {
      case "WAITING_FOR_SLOT": setStep(event.step_index, "waiting"); break;
      case "STEP_STARTED": setStatus("RUNNING"); setStep(event.step_index, "running", { attempts: event.attempt }); break;
      case "STEP_RETRYING": setStep(event.step_index, "retrying"); break;
      case "STEP_COMPLETED": setStep(event.step_index, "done", { duration: event.execution_time_ms }); break;
      case "JOB_COMPLETED": setStatus("COMPLETED"); break;
      case "JOB_CANCELLED": setStatus("CANCELLED"); break;
      case "JOB_RESUMED":
        setStatus("RUNNING");
        if (event.step_index !== undefined) setStep(event.step_index, "pending");
        break;
      case "JOB_ERROR":
        setStatus("FAILED");
        retryable = event.action === "RETRY_AVAILABLE";
        if (event.step_index !== undefined) setStep(event.step_index, "failed");
        $("error-code").textContent = event.error_code;
        $("error-message").textContent = event.message;
        if ($("resume")) $("resume").textContent = retryable ? "Resume" : "Force resume";
        $("error-box").hidden = false;
        break;
    }
  }

  // job_work.js redraws the rest of the page from its data when it hears of an event it has not drawn.
  function announce(event) { root.dispatchEvent(new CustomEvent("job:event", { detail: event })); }

  function onEvent(event) {
    if (event.type === "WS_CONNECTED") { setStatus(event.status); announce(event); return; }
    if (typeof event.seq !== "number" || event.seq <= lastSeq) return;  // already shown
    lastSeq = event.seq;
    root.dataset.lastSeq = String(lastSeq);
    apply(event);
    logEvent(event);
    announce(event);
  }

  function connect() {
    const scheme = window.location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(`${scheme}://${window.location.host}/ws/${jobId}?after=${lastSeq}`);
    window.caoSocket = socket;  // lets tests (and curious humans) drop the connection
    socket.onopen = () => { attempt = 0; setConnection("live"); };
    socket.onmessage = (message) => onEvent(JSON.parse(message.data));
    socket.onclose = (close) => {
      if (close.code === 4401 || close.code === 4404) {
        setConnection(close.code === 4401 ? "not allowed (log in again)" : "job not found");
        return;
      }
      setConnection("reconnecting…");
      const delay = Math.min(5000, 200 * 2 ** attempt++);
      window.setTimeout(connect, delay);
    };
  }

  async function post(path, body) {
    $("action-error").textContent = "";
    const response = await fetch(path, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRFToken": root.dataset.csrf },
      body: JSON.stringify(body || {}),
    });
    if (!response.ok) {
      const payload = await response.json().catch(() => ({}));
      $("action-error").textContent = payload.error ? payload.error.message : "Request failed (" + response.status + ").";
    }
  }

  // The buttons are there only for users allowed to resume and cancel (jobs.change_job).
  if ($("resume")) {
    $("resume").addEventListener("click", () => post(`/api/v1/jobs/${jobId}/resume`, { force: !retryable }));
    if (root.dataset.status === "FAILED" && !retryable) $("resume").textContent = "Force resume";
  }
  if ($("cancel")) $("cancel").addEventListener("click", () => post(`/api/v1/jobs/${jobId}/cancel`));
  connect();
})();
