// The dashboard's actions (POST with the token in a header) and live progress.
"use strict";
(function () {
  const token = document.querySelector('meta[name="p2pbackup-token"]').content;

  async function act(url, body) {
    const response = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-P2PBackup-Token": token },
      body: JSON.stringify(body || {}),
    });
    let answer;
    try {
      answer = await response.json();
    } catch (e) {
      answer = { ok: false, error: (await response.text()) || response.statusText };
    }
    return answer;
  }

  function show(where, answer) {
    if (!where) return;
    where.className = "result " + (answer.ok ? "good" : "bad");
    const lines = answer.lines || [];
    where.textContent = answer.ok ? lines.join("\n") || "done" : answer.error;
  }

  // Jobs this page has seen finish. The answer to the action that started a
  // job says "running" and may arrive after the event stream said "done".
  const finished = new Set();

  function showJob(job) {
    const area = document.getElementById("job");
    if (!area) return;
    if (job.state === "running" && finished.has(job.id)) return;
    if (job.state !== "running") finished.add(job.id);
    area.hidden = false;
    area.dataset.state = job.state;
    const what = job.kind + " #" + job.id;
    area.querySelector(".job-state").textContent =
      job.state === "running" ? what + ": running" : what + ": " + job.state +
      (job.error ? " — " + job.error : "");
    area.querySelector("pre").textContent = job.state === "running" ? job.progress : job.lines.join("\n");
  }

  for (const form of document.querySelectorAll("form[data-action]")) {
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const body = Object.fromEntries(new FormData(form).entries());
      const button = form.querySelector("button");
      if (button) button.disabled = true;
      const answer = await act(form.dataset.action, body);
      if (button) button.disabled = false;
      show(form.nextElementSibling, answer);
      if (answer.job) showJob(answer.job);
    });
  }
  for (const button of document.querySelectorAll("button[data-action]")) {
    button.addEventListener("click", async () => {
      const answer = await act(button.dataset.action);
      if (answer.job) showJob(answer.job);
      else show(document.getElementById("job").querySelector("pre"), answer);
    });
  }
  for (const button of document.querySelectorAll("button.pick")) {
    button.addEventListener("click", () => {
      const input = document.querySelector('#restore-form input[name="path"]');
      input.value = button.dataset.path;
      input.focus();
    });
  }
  if (document.getElementById("job")) {
    const events = new EventSource("/api/events");
    events.onmessage = (message) => {
      const event = JSON.parse(message.data);
      if (event.job) showJob(event.job);
    };
  }
})();
