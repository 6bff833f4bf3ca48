import { describe, expect, it } from "vitest";
import { EngramError, deleteObservations, openStream } from "../src/index.js";
import { listSpace, space, vectors, wsUrl } from "./helpers.js";

const DIM = 8;

describe("deleting over WebSocket", () => {
  it("deletes what the stream has just sent, before its ack arrives", async () => {
    const s = space("ts-delete");
    const stream = await openStream({ url: wsUrl(), space: s });
    const ids = ["keep-1", "gone-1", "keep-2", "gone-2"];
    const ack = stream.send({ vectors: vectors(4, DIM, 1), dim: DIM, ids });
    const deleted = stream.delete({ ids: ["gone-1", "gone-2", "never-written"] });
    expect((await ack).count).toBe(4);
    const r = await deleted;
    expect(r).toMatchObject({ deleted: 2, alreadyDeleted: 0, notFound: 1, lsn: 4 });
    expect(r.requestId).toMatch(/^d/);
    expect(r.committedAt).toMatch(/Z$/);

    const again = await stream.delete({ ids: ["gone-1"] });
    expect(again).toMatchObject({ deleted: 0, alreadyDeleted: 1 });
    const recalled = await stream.recall(vectors(4, DIM, 1).subarray(DIM, 2 * DIM), {
      k: 4,
      consistency: "session",
    });
    expect(recalled.results.map((m) => m.id).sort()).toEqual(["keep-1", "keep-2"]);
    await stream.close();
    expect((await listSpace(s)).sort()).toEqual(["keep-1", "keep-2"]);
  });

  it("deletes a time range, given as Dates or microseconds", async () => {
    const s = space("ts-delete-range");
    const stream = await openStream({ url: wsUrl(), space: s, encoding: "json" });
    const t0 = Date.UTC(2026, 0, 1) * 1000;
    await stream.send({
      vectors: vectors(3, DIM, 2),
      dim: DIM,
      ids: ["old", "mid", "new"],
      timestampsUs: [t0, t0 + 60_000_000, t0 + 120_000_000],
    });
    const r = await stream.delete({ since: new Date(Date.UTC(2026, 0, 1)), untilUs: t0 + 1 });
    expect(r.deleted).toBe(1);
    expect((await stream.delete({ sinceUs: t0 + 120_000_000 })).deleted).toBe(1);
    await stream.close();
    expect(await listSpace(s)).toEqual(["mid"]);
  });

  it("refuses a delete that names nothing, and answers the server's refusal in-band", async () => {
    const s = space("ts-delete-bad");
    const stream = await openStream({ url: wsUrl(), space: s });
    expect(() => stream.delete({})).toThrow(/names ids, or a time range/);
    expect(() => stream.delete({ since: "2026-01-01T00:00:00Z", sinceUs: 1 })).toThrow(/not both/);
    const refused = await stream.delete({ sinceUs: 10, untilUs: 10 }).catch((e: unknown) => e);
    expect(refused).toBeInstanceOf(EngramError);
    expect((refused as EngramError).code).toBe("invalid_argument");
    expect((refused as EngramError).message).toMatch(/holds no time/);
    const ack = await stream.send({ vectors: vectors(1, DIM, 3), dim: DIM, ids: ["x"] });
    expect(ack.count).toBe(1); // the stream goes on
    await stream.close();
  });

  it("deleteObservations opens, deletes and closes a stream of its own", async () => {
    const s = space("ts-delete-once");
    const stream = await openStream({ url: wsUrl(), space: s });
    await stream.send({ vectors: vectors(2, DIM, 4), dim: DIM, ids: ["a", "b"] });
    await stream.close();
    const r = await deleteObservations({ url: wsUrl(), space: s, ids: ["a"] });
    expect(r.deleted).toBe(1);
    expect(await listSpace(s)).toEqual(["b"]);
  });
});
