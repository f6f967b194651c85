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

const PAGE = 50; // queues a page of the list shows
export const POLL_SECONDS = 5; // how often counts refresh when the stream cannot follow every queue

export function queuesView(main, { access, stream }) {
  const rows = new Map(); // name -> {queue, element, chips, chart, rates}
  const state = { offset: 0, loading: 0, poll: null };
  const showDeleted = h("input", { type: "checkbox", onchange: () => first() });
  const filter = h("input", { class: "queue-filter", type: "search", name: "filter", placeholder: "Filter by name", "aria-label": "Filter queues by name", maxlength: 64, autocomplete: "off" });
  let typing = null;
  filter.addEventListener("input", () => (clearTimeout(typing), (typing = setTimeout(first, 250))));
  const list = h("div", { class: "queue-list", role: "list" });
  const summary = h("span", { class: "muted" });
  const mode = h("p", { class: "mode-note", role: "status", "data-testid": "overview", hidden: true });
  const pageInfo = h("span", { class: "muted small" });
  const previous = h("button", { class: "small", type: "button", onclick: () => turn(-1) }, "‹ Previous");
  const next = h("button", { class: "small", type: "button", onclick: () => turn(1) }, "Next ›");
  const pager = h("footer", { class: "pager list-pager", "aria-label": "Pages of queues" }, pageInfo, h("div", {}, previous, next));
  const create = access.managesSome ? h("button", { class: "primary", type: "button", onclick: () => edit(null) }, plus(), "New queue") : null;
  const chartHead = h("span", {}, "Throughput, last 5 min");
  replace(
    main,
    h("div", { class: "view-head" }, h("div", {}, h("h1", {}, "Queues"), summary), h("div", { class: "actions" }, filter, access.managesSome ? h("label", { class: "check" }, showDeleted, " Show deleted") : null, create)),
    mode,
    h("div", { class: "queue-list-head", "aria-hidden": "true" }, h("span", {}, "Queue"), h("span", {}, "Messages"), chartHead, h("span", {})),
    list,
    pager,
  );

  function first() {
    state.offset = 0;
    load();
  }

  function turn(by) {
    state.offset = Math.max(0, state.offset + by * PAGE);
    load();
  }

  // The page of queues the filter and paging ask for; a newer load wins over an older one.
  async function load() {
    const mine = ++state.loading;
    const page = await fetchPage();
    if (mine !== state.loading) return;
    if (!page.items.length && state.offset > 0 && page.total > 0) {
      state.offset = Math.floor((page.total - 1) / PAGE) * PAGE; // fewer queues now: the last page
      return load();
    }
    show(page.items);
    // In overview, the whole list (unfiltered, live queues) and the notifications fit one stream now.
    const limit = stream.overview?.limit;
    if (limit && !filter.value.trim() && !showDeleted.checked && page.total + 1 <= limit) stream.replan();
    summary.textContent = `${count(page.total)} ${page.total === 1 ? "queue" : "queues"}${filter.value.trim() ? " match" : ""}`;
    const end = state.offset + page.items.length;
    pageInfo.textContent = page.total ? `${count(state.offset + 1)}–${count(end)} of ${count(page.total)}` : "";
    previous.disabled = state.offset === 0;
    next.disabled = end >= page.total;
    pager.hidden = page.total <= PAGE;
    draw();
  }

  // The API's own page, of the queues whose name holds what the filter says.
  function fetchPage() {
    const deleted = showDeleted.checked || "";
    const name = filter.value.trim().toLowerCase();
    if (!/^[a-z0-9._-]*$/.test(name)) return Promise.resolve({ items: [], total: 0, has_more: false }); // no name holds it
    return api(`/queues${query({ limit: PAGE, offset: state.offset, include_deleted: deleted, name })}`);
  }

  // The same queues as shown: their counts change in place (focus stays where it is); else anew.
  function show(queues) {
    const shown = [...rows.keys()];
    const same = queues.length > 0 && queues.length === shown.length && queues.every((q, i) => shown[i] === q.name);
    if (!same) {
      rows.clear();
      replace(list, queues.map((q) => row(q)));
      if (!queues.length) list.append(h("p", { class: "empty" }, emptyText()));
      return;
    }
    for (const queue of queues) {
      const item = rows.get(queue.name);
      if (JSON.stringify({ ...queue, messages: 0 }) !== JSON.stringify({ ...item.queue, messages: 0 })) item.element.replaceWith(row(queue));
      else if (JSON.stringify(queue.messages) !== JSON.stringify(item.queue.messages)) {
        item.queue = queue;
        replace(item.chips, countChips(queue.messages));
      }
    }
  }

  function emptyText() {
    if (filter.value.trim()) return "No queue's name has that in it.";
    return access.managesSome ? "No queues yet. Create one, or publish to a name and it is made for you." : "No queues you may see yet.";
  }

  // Overview: the stream follows only the notifications and open queues, so counts are polled.
  function paintMode(overview) {
    clearInterval(state.poll);
    state.poll = overview ? setInterval(() => load().catch(() => {}), POLL_SECONDS * 1000) : null;
    mode.hidden = !overview;
    list.classList.toggle("polled", Boolean(overview));
    chartHead.textContent = overview ? "" : "Throughput, last 5 min";
    const limit = overview?.limit ? ` (at most ${count(overview.limit)} logs)` : "";
    mode.textContent = overview ? `Counts refresh every ${POLL_SECONDS} s rather than live: your queues are more than one live stream follows${limit}. A queue you open is live.` : "";
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

  const offs = [stream.on("event", onEvent), stream.on("reset", () => load()), stream.on("resync", () => load()), stream.on("overview", paintMode)];
  const ticker = setInterval(draw, 1000);
  paintMode(stream.overview);
  load().catch((error) => toast(error.message, "error"));
  return () => {
    clearInterval(ticker);
    clearInterval(state.poll);
    clearTimeout(typing);
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
