// Published and acked per second for each queue, over the last minutes, from the live events.

export const BUCKET_MS = 5000;
export const BUCKETS = 60; // five minutes

export class Rates {
  constructor(snapshot = {}) {
    this.queues = new Map(Object.entries(snapshot).map(([queue, rows]) => [queue, new Map(rows.map(([at, pub, ack]) => [at, [pub, ack]]))]));
  }

  count(type, data, now = Date.now()) {
    const column = type === "message.created" ? 0 : type === "message.acked" ? 1 : -1;
    if (column < 0 || typeof data?.queue !== "string") return;
    const bucket = Math.floor(now / BUCKET_MS);
    let buckets = this.queues.get(data.queue);
    if (!buckets) this.queues.set(data.queue, (buckets = new Map()));
    const row = buckets.get(bucket) ?? [0, 0];
    row[column] += 1;
    buckets.set(bucket, row);
    for (const at of buckets.keys()) if (at <= bucket - BUCKETS) buckets.delete(at);
  }

  // Two series of BUCKETS values (per second), oldest first; the bucket still filling is left out.
  series(queue, now = Date.now()) {
    const last = Math.floor(now / BUCKET_MS) - 1;
    const buckets = this.queues.get(queue) ?? new Map();
    const published = [];
    const acked = [];
    for (let at = last - BUCKETS + 1; at <= last; at++) {
      const [pub, ack] = buckets.get(at) ?? [0, 0];
      published.push(pub / (BUCKET_MS / 1000));
      acked.push(ack / (BUCKET_MS / 1000));
    }
    return { published, acked };
  }

  snapshot() {
    return Object.fromEntries([...this.queues].map(([queue, buckets]) => [queue, [...buckets].map(([at, [pub, ack]]) => [at, pub, ack])]));
  }
}
