import { describe, expect, it } from "vitest";
import { EngramError, openStream, type Ack, type StreamEvent } from "../src/index.js";
import { listSpace, space, vectors, waitFor, wsUrl } from "./helpers.js";

const DIM = 16;

describe("EngramStream against a running gateway", () => {
  it("opens a session, streams binary batches and gets one ack per batch, in order", async () => {
    const events: StreamEvent[] = [];
    const s = space("ts-basic");
    const stream = await openStream({ url: wsUrl(), space: s, onEvent: (e) => events.push(e) });
    expect(stream.sessionId).toMatch(/^s-/);
    expect(events[0]?.kind).toBe("connected");

    const acks: Promise<Ack>[] = [];
    for (let b = 0; b < 20; b++) {
      await stream.writable();
      const ids = Array.from({ length: 10 }, (_, i) => `basic-${b}-${i}`);
      acks.push(stream.send({ vectors: vectors(10, DIM, b), dim: DIM, ids }));
      expect(stream.inFlight).toBeLessThanOrEqual(stream.maxInFlight);
    }
    const done = await Promise.all(acks);
    expect(done.map((a) => a.sequenceNumber)).toEqual(Array.from({ length: 20 }, (_, i) => i + 1));
    expect(done.every((a) => a.count === 10 && !a.duplicate)).toBe(true);
    expect(stream.lastAcked).toBe(20);
    await stream.close();

    const ids = await listSpace(s);
    expect(ids.length).toBe(200);
    expect(new Set(ids).size).toBe(200);
  });

  it("sends JSON batch frames (base64 vectors) as well", async () => {
    const s = space("ts-json");
    const stream = await openStream({ url: wsUrl(), space: s, encoding: "json" });
    const ack = await stream.send({
      vectors: [
        [1, 0, 0, 0],
        [0, 1, 0, 0],
      ],
      ids: ["j-1", "j-2"],
      contents: ["one", "two"],
      confidences: [0.9, 0.8],
      timestampsUs: [1_700_000_000_000_000, 1_700_000_000_000_001],
      priority: "high",
    });
    expect(ack).toMatchObject({ sequenceNumber: 1, count: 2, memoryId: "j-1" });
    const r = await stream.recall([0, 1, 0, 0], { k: 1, consistency: "session" });
    expect(r.results[0]).toMatchObject({ id: "j-2", content: "two" });
    expect(r.results[0].confidence).toBeCloseTo(0.8, 5);
    expect(r.results[0].when).toBe("2023-11-14T22:13:20.000001Z");
    await stream.close();
  });

  it("recalls what it wrote (session consistency), nearest first", async () => {
    const s = space("ts-recall");
    const stream = await openStream({ url: wsUrl(), space: s });
    const v = vectors(50, DIM, 7);
    await stream.send({
      vectors: v,
      dim: DIM,
      ids: Array.from({ length: 50 }, (_, i) => `m-${i}`),
      contents: Array.from({ length: 50 }, (_, i) => `memory ${i}`),
    });
    const cue = v.subarray(17 * DIM, 18 * DIM);
    const r = await stream.recall(cue, { k: 5, consistency: "session" });
    expect(r.requestId).toMatch(/^r\d+$/);
    expect(r.results.length).toBe(5);
    expect(r.results[0].id).toBe("m-17");
    expect(r.results[0].content).toBe("memory 17");
    expect(r.results[0].score).toBeGreaterThan(0.999);
    expect(r.snapshotSequence).toBeGreaterThanOrEqual(50);
    for (let i = 1; i < r.results.length; i++) {
      expect(r.results[i - 1].score).toBeGreaterThanOrEqual(r.results[i].score);
    }
    await expect(stream.recall(cue, { k: 0 })).rejects.toMatchObject({ code: "k_out_of_range" });
    await stream.close();
  });

  it("resumes a session on a new stream with the next sequence number", async () => {
    const s = space("ts-resume");
    const first = await openStream({ url: wsUrl(), space: s });
    for (let b = 0; b < 3; b++) {
      await first.send({ vectors: vectors(5, DIM, b), dim: DIM, ids: [0, 1, 2, 3, 4].map((i) => `r-${b}-${i}`) });
    }
    const sessionId = first.sessionId;
    await first.close();

    const events: StreamEvent[] = [];
    const second = await openStream({ url: wsUrl(), space: s, sessionId, onEvent: (e) => events.push(e) });
    expect(events[0]).toMatchObject({ kind: "resumed", sessionId, initialSequence: 3 });
    const ack = await second.send({ vectors: vectors(5, DIM, 9), dim: DIM, ids: [0, 1, 2, 3, 4].map((i) => `r-9-${i}`) });
    expect(ack.sequenceNumber).toBe(4);
    expect(ack.duplicate).toBe(false);
    await second.close();
    expect((await listSpace(s)).length).toBe(20);
  });

  it("fails only a batch refused for good and renumbers the rest without a gap", async () => {
    const s = space("ts-refused");
    const stream = await openStream({ url: wsUrl(), space: s });
    await stream.send({ vectors: vectors(2, DIM, 1), dim: DIM, ids: ["a-0", "a-1"] });
    const bad = stream.send({ vectors: vectors(2, DIM + 1, 2), dim: DIM + 1, ids: ["bad-0", "bad-1"] });
    const later = [
      stream.send({ vectors: vectors(2, DIM, 3), dim: DIM, ids: ["b-0", "b-1"] }),
      stream.send({ vectors: vectors(2, DIM, 4), dim: DIM, ids: ["c-0", "c-1"] }),
    ];
    const err = await bad.catch((e: unknown) => e);
    expect(err).toBeInstanceOf(EngramError);
    expect((err as EngramError).code).toBe("wrong_dimension");
    const acks = await Promise.all(later);
    expect(acks.map((a) => a.sequenceNumber)).toEqual([2, 3]);
    await stream.close();
    expect((await listSpace(s)).sort()).toEqual(["a-0", "a-1", "b-0", "b-1", "c-0", "c-1"]);
  });

  it("gets heartbeats from the server and answers flow control with a status", async () => {
    const s = space("ts-heartbeat");
    const stream = await openStream({ url: wsUrl(), space: s });
    await waitFor(() => stream.heartbeats >= 2, 5000, "two heartbeats (ENGRAM_WS_HEARTBEAT_S=1)");
    const statuses: string[] = [];
    stream.on((e) => {
      if (e.kind === "status") statuses.push(e.status.state);
    });
    expect(stream.flowControl("buffer_status")).toBe(true);
    await waitFor(() => statuses.length > 0, 5000, "a status frame");
    expect(stream.status?.queue_capacity).toBe(stream.maxInFlight);
    expect(stream.connected).toBe(true);
    await stream.close();
    expect(stream.connected).toBe(false);
  });

  it("refuses an invalid space at open, and a closed stream refuses work", async () => {
    await expect(openStream({ url: wsUrl(), space: "X!" })).rejects.toMatchObject({
      code: "invalid_space_id",
    });
    const stream = await openStream({ url: wsUrl(), space: space("ts-closed") });
    await stream.close();
    await expect(stream.send({ vectors: [[1, 2]] })).rejects.toMatchObject({ code: "closed" });
  });
});
