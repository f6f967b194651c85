// The bell with the live unread count, and the panel of notifications (mark read, mark all read).

import { api, query } from "./api.js";
import { ago, h, replace, safeHref, toast } from "./dom.js";
import { bell } from "./icons.js";

const PAGE = 50;

export function notifications(stream) {
  const badge = h("span", { class: "badge", hidden: true, "data-testid": "unread" }, "0");
  const button = h("button", { class: "icon ghost bell", type: "button", "aria-label": "Notifications", "aria-expanded": "false", "aria-controls": "notifications" }, bell(), badge);
  const list = h("ol", { class: "notes" });
  const unreadOnly = h("input", { type: "checkbox", onchange: () => load() });
  const markAll = h("button", { class: "small", type: "button", onclick: () => markAllRead() }, "Mark all read");
  const close = h("button", { class: "icon ghost", type: "button", "aria-label": "Close notifications", onclick: () => toggle(false) }, "✕");
  const panel = h(
    "aside",
    { id: "notifications", class: "drawer", hidden: true, "aria-label": "Notifications", tabindex: "-1" },
    h("header", { class: "drawer-head" }, h("h2", {}, "Notifications"), markAll, close),
    h("label", { class: "check" }, unreadOnly, " Unread only"),
    list,
  );
  const items = new Map(); // id -> {data, row}
  let unread = 0;

  button.addEventListener("click", () => toggle(panel.hidden));
  panel.addEventListener("keydown", (event) => event.key === "Escape" && toggle(false));

  function toggle(open) {
    panel.hidden = !open;
    button.setAttribute("aria-expanded", String(open));
    if (open) {
      load();
      panel.focus();
    } else button.focus();
  }

  function setUnread(n) {
    unread = Math.max(0, n);
    badge.textContent = unread > 99 ? "99+" : String(unread);
    badge.hidden = unread === 0;
    button.setAttribute("aria-label", unread ? `Notifications, ${unread} unread` : "Notifications");
    markAll.disabled = unread === 0;
  }

  async function load() {
    const page = await api(`/notifications${query({ limit: PAGE, unread_only: unreadOnly.checked || "" })}`);
    items.clear();
    replace(list, page.items.map((n) => row(n)));
    if (!page.items.length) list.append(h("li", { class: "empty" }, unreadOnly.checked ? "Nothing unread." : "No notifications yet."));
    setUnread(page.unread_count);
  }

  function row(note) {
    const link = safeHref(note.action_url);
    const toggleRead = h("button", { class: "small ghost", type: "button", onclick: () => mark(note.id, !items.get(note.id).data.is_read) });
    const element = h(
      "li",
      { class: `note priority-${note.priority}`, dataset: { id: note.id } },
      h("div", { class: "note-main" },
        h("p", { class: "note-title" }, note.title),
        note.message ? h("p", { class: "note-text" }, note.message) : null,
        h("p", { class: "note-meta" }, h("span", { class: `pill ${note.priority}` }, note.priority), ` ${note.type}`, note.queue ? ` · ${note.queue}` : "", ` · ${ago(note.created_at)}`,
          link ? [" · ", h("a", { href: link, rel: "noreferrer" }, "Open")] : null),
      ),
      toggleRead,
    );
    items.set(note.id, { data: note, element, toggleRead });
    paint(note.id);
    return element;
  }

  function paint(id) {
    const item = items.get(id);
    item.element.classList.toggle("unread", !item.data.is_read);
    item.toggleRead.textContent = item.data.is_read ? "Mark unread" : "Mark read";
  }

  async function mark(id, isRead) {
    try {
      update(await api(`/notifications/${encodeURIComponent(id)}`, { method: "PATCH", json: { is_read: isRead } }));
    } catch (error) {
      toast(error.message, "error");
    }
  }

  async function markAllRead() {
    try {
      await api("/notifications/mark-all-read", { method: "POST" });
      for (const id of items.keys()) update({ ...items.get(id).data, is_read: true });
      setUnread(0);
    } catch (error) {
      toast(error.message, "error");
    }
  }

  function update(note) {
    const item = items.get(note.id);
    if (!item) return;
    item.data = note;
    paint(note.id);
  }

  stream.on("event", ({ type, data }) => {
    if (type === "unread_count") setUnread(data.unread_count);
    else if (type === "notification.created") {
      setUnread(unread + (data.is_read ? 0 : 1));
      if (!panel.hidden) list.querySelector(".empty")?.remove(), list.prepend(row(data));
    } else if (type === "notification.read") update(data);
    else if (type === "notification.deleted") items.get(data.id)?.element.remove();
  });

  stream.on("resync", () => !panel.hidden && load()); // the new stream's unread_count sets the badge
  api("/notifications/unread-count").then((body) => setUnread(body.unread_count), () => {});
  return { button, panel };
}
