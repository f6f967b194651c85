// Which server stream carries what the dashboard follows: the one place that knows the endpoint.
// One multiplexed stream (`/api/v1/stream`) for the queues the token may follow and its own
// notifications: each event's data names its log, and its id is the whole cursor vector.

export const NOTIFICATIONS = "@notifications";

export function streamSources(plan) {
  const search = new URLSearchParams();
  for (const pattern of plan.queues) search.append("queue", pattern);
  if (plan.notifications) search.set("notifications", "true");
  return [{ key: "all", url: `/api/v1/stream?${search}`, logOf, seqOf }];
}

export function withCursor(url, cursor) {
  return `${url}${url.includes("?") ? "&" : "?"}last_event_id=${encodeURIComponent(cursor)}`;
}

// `unread_count` frames name no log: they are the notifications'.
function logOf(data) {
  return typeof data?.log === "string" ? data.log : NOTIFICATIONS;
}

// 41 for `orders` in `orders:41,billing:7,@notifications:3` (queue names hold no `,` or `:`).
function seqOf(cursor, log) {
  for (const part of cursor.split(",")) {
    const at = part.lastIndexOf(":");
    if (part.slice(0, at) === log) return Number(part.slice(at + 1));
  }
  return undefined;
}
