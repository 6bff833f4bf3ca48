import { afterAll, beforeAll, expect, it } from "vitest";
import { openStream, type Ack, type StreamEvent } from "../src/index.js";
import { startCluster, type Cluster } from "./cluster.js";
import { listSpace, vectors } from "./helpers.js";

// A one-shard cluster with a tiny memory budget and a slow index builder: admission control
// refuses batches (acks with status "rejected" and a retry-after) once un-indexed data fills it.
const ENV = {
  ENGRAM_MEMORY_BUDGET: "2MB",
  ENGRAM_INDEX_BUILD_CHUNK: "16",
  ENGRAM_INDEX_BUILD_THREADS: "1",
  ENGRAM_HNSW_EF_CONSTRUCTION: "200",
};
const DIM = 64;
const PER_BATCH = 250; // 64 KB of vectors
const BATCHES = 80; // 5 MB offered to a 2 MB budget

let cluster: Cluster;

beforeAll(async () => {
  cluster = await startCluster({ shards: 1, env: ENV });
});

afterAll(async () => {
  await cluster?.stop();
});

it("resends batches refused by admission control after their retry-after, storing each once", async () => {
  const events: StreamEvent[] = [];
  const stream = await openStream({
    url: `ws://127.0.0.1:${cluster.httpPort}/v1/stream`,
    space: "ts-admission",
    onEvent: (e) => events.push(e),
    targetLatencyMs: 0, // every credit: push as hard as admission lets us
  });
  const expected: string[] = [];
  const acks: Promise<Ack>[] = [];
  for (let b = 0; b < BATCHES; b++) {
    await stream.writable();
    const ids = Array.from({ length: PER_BATCH }, (_, i) => `adm-${b}-${i}`);
    expected.push(...ids);
    acks.push(stream.send({ vectors: vectors(PER_BATCH, DIM, b), dim: DIM, ids }));
  }
  const done = await Promise.all(acks);
  expect(done.map((a) => a.sequenceNumber)).toEqual(Array.from({ length: BATCHES }, (_, i) => i + 1));
  expect(stream.rejections).toBeGreaterThan(0);
  const rejected = events.filter((e) => e.kind === "rejected");
  expect(rejected.length).toBe(stream.rejections);
  expect(rejected.every((e) => e.kind === "rejected" && e.retryAfterMs > 0)).toBe(true);
  expect(events.some((e) => e.kind === "status" && e.status.level !== "level_normal")).toBe(true);
  await stream.close();

  const ids = await listSpace("ts-admission", cluster.dataDir);
  expect(ids.length).toBe(expected.length); // a refused attempt left no trace
  expect(new Set(ids)).toEqual(new Set(expected));
}, 180_000);
