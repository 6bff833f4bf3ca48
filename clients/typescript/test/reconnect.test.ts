import { expect, it } from "vitest";
import { openStream, type Ack, type StreamEvent } from "../src/index.js";
import { listSpace, pidOf, space, vectors, waitFor, wsUrl } from "./helpers.js";

const DIM = 8;
const BATCHES = 120;
const PER_BATCH = 25;

it("resumes after the gateway is killed mid-stream: nothing lost, nothing duplicated", async () => {
  const s = space("ts-kill");
  const events: StreamEvent[] = [];
  const stream = await openStream({
    url: wsUrl(),
    space: s,
    onEvent: (e) => events.push(e),
    reconnectTimeoutMs: 60_000,
  });
  const expected: string[] = [];
  const acks: Promise<Ack>[] = [];
  const gateway = pidOf("gateway");
  let killed = false;
  for (let b = 0; b < BATCHES; b++) {
    await stream.writable();
    const ids = Array.from({ length: PER_BATCH }, (_, i) => `k-${b}-${i}`);
    expected.push(...ids);
    acks.push(stream.send({ vectors: vectors(PER_BATCH, DIM, b), dim: DIM, ids }));
    if (b === 40) {
      await waitFor(() => stream.lastAcked >= 20, 10_000, "some acks before the kill");
      process.kill(gateway, "SIGKILL"); // the launcher restarts it on the same ports
      killed = true;
    }
  }
  expect(killed).toBe(true);
  const done = await Promise.all(acks);
  expect(stream.reconnects).toBeGreaterThanOrEqual(1);
  expect(events.some((e) => e.kind === "resumed")).toBe(true);
  expect(done.map((a) => a.sequenceNumber)).toEqual(Array.from({ length: BATCHES }, (_, i) => i + 1));
  expect(pidOf("gateway")).not.toBe(gateway);
  await stream.close();

  const ids = await listSpace(s);
  expect(ids.length).toBe(expected.length); // no duplicate stored
  expect(new Set(ids)).toEqual(new Set(expected)); // nothing lost
});
