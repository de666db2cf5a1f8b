// Jobs page: start a job through the API (staff session + CSRF) and keep the table fresh.
(function () {
  "use strict";
  const form = document.getElementById("new-job");
  const error = document.getElementById("new-job-error");

  // The form is there only for users allowed to start jobs (jobs.add_job).
  if (form) form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    let inputData;
    try {
      inputData = JSON.parse(document.getElementById("new-job-input").value || "{}");
    } catch (e) {
      error.textContent = "input_data is not valid JSON: " + e.message;
      return;
    }
    const response = await fetch("/api/v1/jobs", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRFToken": form.dataset.csrf },
      body: JSON.stringify({ feature_name: document.getElementById("new-job-feature").value, input_data: inputData }),
    });
    const body = await response.json();
    if (!response.ok) {
      error.textContent = body.error ? body.error.message : "The job could not be started.";
      return;
    }
    window.location.href = "/jobs/" + body.job_id + "/";
  });

  async function refresh() {
    const params = new URLSearchParams(window.location.search);
    params.set("partial", "1");
    try {
      const response = await fetch(window.location.pathname + "?" + params, { credentials: "same-origin" });
      if (response.ok) document.getElementById("job-rows").innerHTML = await response.text();
    } catch (e) { /* offline for a moment: try again at the next tick */ }
  }
  setInterval(refresh, 3000);
})();
