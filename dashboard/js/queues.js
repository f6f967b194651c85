// The Queues view: every queue the token may see, live counts by status and a live throughput
// chart each, all from the stream; create, change, delete and restore for those who may manage.

import { api, query, queuePath } from "./api.js";
import { legend, throughputChart } from "./chart.js";
import { count, dialog, field, h, replace, toast } from "./dom.js";
import { plus } from "./icons.js";

export const STATUSES = ["pending", "processing", "done", "dead"];
// The status a message left, for the events that say only where it went.
const LEFT = {
  "message.claimed": "pending",
  "message.acked": "processing",
  "message.retrying": "processing",
  "message.dead": "processing",
  "message.released": "processing",
  "message.redriven": "dead",
};

// Move a queue's counts by one message event; true when they changed.
export function applyMessageEvent(counts, type, data) {
  const gone = type === "message.deleted" || type === "message.expired";
  const from = gone ? data.status : LEFT[type];
  const to = gone ? null : type === "message.created" || from ? data.status : null;
  if (from) counts[from] = Math.max(0, (counts[from] ?? 0) - 1);
  if (to) counts[to] = (counts[to] ?? 0) + 1;
  return Boolean(from || to);
}

export function countChips(counts) {
  return STATUSES.map((status) =>
    h("span", { class: `chip ${status}`, title: status, dataset: { status } }, h("span", { class: "chip-label" }, status), h("b", {}, count(counts[status] ?? 0))),
  );
}

export function queuesView(main, { access, stream }) {
  const rows = new Map(); // name -> {queue, element, chips, chart, rates}
  const showDeleted = h("input", { type: "checkbox", onchange: () => load() });
  const list = h("div", { class: "queue-list", role: "list" });
  const summary = h("span", { class: "muted" });
  const create = access.managesSome ? h("button", { class: "primary", type: "button", onclick: () => edit(null) }, plus(), "New queue") : null;
  replace(
    main,
    h("div", { class: "view-head" }, h("div", {}, h("h1", {}, "Queues"), summary), h("div", { class: "actions" }, access.managesSome ? h("label", { class: "check" }, showDeleted, " Show deleted") : null, create)),
    h("div", { class: "queue-list-head", "aria-hidden": "true" }, h("span", {}, "Queue"), h("span", {}, "Messages"), h("span", {}, "Throughput, last 5 min"), h("span", {})),
    list,
  );

  async function load() {
    const page = await api(`/queues${query({ limit: 200, include_deleted: showDeleted.checked || "" })}`);
    rows.clear();
    replace(list, page.items.map((q) => row(q)));
    if (!page.items.length) list.append(h("p", { class: "empty" }, access.managesSome ? "No queues yet. Create one, or publish to a name and it is made for you." : "No queues you may see yet."));
    summary.textContent = `${page.total} ${page.total === 1 ? "queue" : "queues"}`;
    draw();
  }

  function row(queue) {
    const chips = h("div", { class: "chips" }, countChips(queue.messages));
    const chart = throughputChart();
    const rates = h("span", { class: "rates" });
    const deleted = Boolean(queue.deleted_at);
    const manage = access.can("manage", queue.name);
    const actions = h("div", { class: "row-actions" },
      manage && !deleted ? h("button", { class: "small ghost", type: "button", onclick: () => edit(rows.get(queue.name).queue) }, "Edit") : null,
      manage && !deleted ? h("button", { class: "small ghost danger", type: "button", onclick: () => remove(queue.name) }, "Delete") : null,
      manage && deleted ? h("button", { class: "small", type: "button", onclick: () => restore(queue.name) }, "Restore") : null,
    );
    const name = deleted ? h("span", { class: "queue-name" }, queue.name) : h("a", { class: "queue-name", href: `#/queues/${encodeURIComponent(queue.name)}` }, queue.name);
    const element = h("div", { class: deleted ? "queue-row deleted" : "queue-row", role: "listitem", dataset: { queue: queue.name } },
      h("div", { class: "queue-title" }, name, deleted ? h("span", { class: "pill" }, "deleted") : null, h("p", { class: "muted small clamp" }, queue.description || `owned by ${queue.owner}`)),
      chips,
      h("div", { class: "throughput" }, chart.element, rates),
      actions,
    );
    rows.set(queue.name, { queue, element, chips, chart, rates });
    return element;
  }

  function draw() {
    for (const [name, item] of rows) {
      const series = stream.rates.series(name);
      item.chart.draw(series);
      legend(item.rates, series);
    }
  }

  function onEvent({ type, data }) {
    if (type.startsWith("message.")) {
      const item = rows.get(data.queue);
      if (item && applyMessageEvent(item.queue.messages, type, data)) replace(item.chips, countChips(item.queue.messages));
    } else if (type === "queue.created" || type === "queue.restored" || type === "queue.deleted") load();
    else if (type === "queue.updated" && rows.has(data.name)) {
      const item = rows.get(data.name);
      item.queue = { ...data, messages: item.queue.messages };
      item.element.replaceWith(row(item.queue));
    }
  }

  async function remove(name) {
    if (!(await confirmDialog(`Delete ${name}?`, "Its messages and events are kept: a manager can restore the queue later. Publishing to it stops at once.", "Delete queue"))) return;
    await act(() => api(queuePath(name), { method: "DELETE" }), `Deleted ${name}`);
  }

  async function restore(name) {
    await act(() => api(queuePath(name, "/restore"), { method: "POST" }), `Restored ${name}`);
  }

  async function act(call, done) {
    try {
      await call();
      toast(done);
      load();
    } catch (error) {
      toast(error.message, "error");
    }
  }

  function edit(queue) {
    queueDialog(queue, () => load());
  }

  const offs = [stream.on("event", onEvent), stream.on("reset", () => load())];
  const ticker = setInterval(draw, 1000);
  load().catch((error) => toast(error.message, "error"));
  return () => {
    clearInterval(ticker);
    offs.forEach((off) => off());
  };
}

export function confirmDialog(title, text, action) {
  return new Promise((resolve) => {
    let answer = false;
    const yes = h("button", { class: "danger-solid", type: "button", onclick: () => ((answer = true), node.close()) }, action);
    const no = h("button", { type: "button", onclick: () => node.close() }, "Cancel");
    const node = dialog(title, [h("p", {}, text), h("div", { class: "dialog-actions" }, no, yes)], { onclose: () => resolve(answer) });
    no.focus();
  });
}

const NUMBERS = [
  ["max_attempts", "Max attempts", "then the message is dead", 1],
  ["visibility_timeout", "Visibility timeout (s)", "a lease's default length", 0.1],
  ["backoff_base", "Backoff base (s)", "first retry delay, doubled each time", 0.1],
  ["backoff_max", "Backoff max (s)", "", 0.1],
  ["retention_seconds", "Retention (s)", "0 keeps messages forever", 1],
  ["alert_after", "Alert after (s)", "notify the owner when the oldest pending is older; empty for never", 1],
];

function queueDialog(queue, saved) {
  const creating = queue === null;
  const name = h("input", { name: "name", required: true, pattern: "[a-z0-9][a-z0-9._\\-]*", maxlength: 64, autocomplete: "off", placeholder: "builds.nightly" });
  const description = h("textarea", { name: "description", rows: 2, maxlength: 2000, value: queue?.description ?? "" });
  const urgent = h("input", { type: "checkbox", name: "dead_letter_urgent", checked: Boolean(queue?.dead_letter_urgent) });
  const numbers = NUMBERS.map(([key, label, hint, step]) => [key, h("input", { type: "number", name: key, step, min: 0, value: queue?.[key] ?? "" }), label, hint]);
  const problem = h("p", { class: "form-error", role: "alert", hidden: true });
  const form = h("form", { class: "form", onsubmit: (event) => submit(event) },
    creating ? field("Name", name, "lowercase letters, digits, . _ -") : null,
    field("Description", description),
    h("div", { class: "form-grid" }, numbers.map(([, input, label, hint]) => field(label, input, hint))),
    h("label", { class: "check" }, urgent, " Dead-letter notifications are urgent"),
    problem,
    h("div", { class: "dialog-actions" }, h("button", { type: "button", onclick: () => node.close() }, "Cancel"), h("button", { class: "primary", type: "submit" }, creating ? "Create queue" : "Save")),
  );
  const node = dialog(creating ? "New queue" : `Edit ${queue.name}`, form);
  (creating ? name : description).focus();

  async function submit(event) {
    event.preventDefault();
    const body = { description: description.value, dead_letter_urgent: urgent.checked };
    for (const [key, input] of numbers) {
      if (input.value !== "") body[key] = Number(input.value);
      else if (key === "alert_after" && !creating) body[key] = null;
    }
    try {
      if (creating) await api("/queues", { method: "POST", json: { name: name.value, ...body } });
      else await api(queuePath(queue.name), { method: "PATCH", json: body });
      node.close();
      toast(creating ? `Created ${name.value}` : `Saved ${queue.name}`);
      saved();
    } catch (error) {
      replace(problem, error.message, error.fields.map((line) => h("span", { class: "block" }, line)));
      problem.hidden = false;
    }
  }
}
