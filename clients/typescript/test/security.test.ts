/**
 * API keys and TLS. Against a fake gateway in this process (a `ws` server, over HTTPS with a CA
 * made by the Python helper): where the key travels (the handshake header on Node, the init
 * frame with a browser-style WebSocket), `wss://` trusting the given CA only, and refusals as
 * typed errors that are not retried. Against a real cluster with a keys file: a key with the
 * scope writes and reads back, a wrong key and a key for other spaces are refused.
 */

import { execFile } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createServer as createHttps, type Server as HttpsServer } from "node:https";
import { createServer as createHttp, type IncomingMessage, type Server } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { WebSocket as NodeWebSocket, WebSocketServer } from "ws";
import { EngramError, openStream, type WebSocketCtor } from "../src/index.js";
import { helper, python, startCluster, type Cluster } from "./cluster.js";
import { listSpace, space, vectors } from "./helpers.js";

const run = promisify(execFile);
const KEY = "ek_0123456789ab_" + "A".repeat(43);

async function py(...args: string[]): Promise<Record<string, string>> {
  const { stdout } = await run(python, [helper, ...args]);
  return JSON.parse(stdout) as Record<string, string>;
}

interface Handshake {
  authorization?: string;
  init?: Record<string, unknown>;
}

/** A fake gateway: answers init with init_ack and batches with acks (or `batchError` once per
 * sequence number); refuses handshakes with `refuse` (an HTTP status) when set. */
class FakeGateway {
  readonly handshakes: Handshake[] = [];
  readonly batches: number[] = [];
  refuse = 0;
  batchError: Record<string, unknown> | null = null;
  private wss = new WebSocketServer({ noServer: true });

  constructor(readonly server: Server | HttpsServer) {
    server.on("upgrade", (req: IncomingMessage, socket, head) => {
      const shake: Handshake = { authorization: req.headers.authorization };
      this.handshakes.push(shake);
      if (this.refuse) {
        socket.end(`HTTP/1.1 ${this.refuse} Refused\r\nContent-Length: 0\r\n\r\n`);
        return;
      }
      this.wss.handleUpgrade(req, socket, head, (ws) => this.serve(ws, shake));
    });
  }

  private serve(ws: NodeWebSocket, shake: Handshake): void {
    const batch = (seq: number) => {
      const first = !this.batches.includes(seq);
      this.batches.push(seq);
      if (this.batchError && first) {
        ws.send(JSON.stringify({ type: "error", sequence_number: seq, ...this.batchError }));
        return;
      }
      const ack = { type: "ack", sequence_number: seq, status: "accepted", count: 1 };
      ws.send(JSON.stringify({ ...ack, first_lsn: seq, duplicate: false, retry_after_ms: 0 }));
    };
    ws.on("message", (data, isBinary) => {
      if (isBinary) {
        batch(1); // binary frames only in tests that send one batch
        return;
      }
      const frame = JSON.parse(String(data)) as Record<string, unknown>;
      if (frame.type === "batch") {
        batch(frame.sequence_number as number);
      } else if (frame.type === "init") {
        shake.init = frame;
        const initAck = {
          type: "init_ack",
          session_id: "s-1",
          sequence_number: 0,
          initial_sequence: 0,
          max_in_flight_batches: 4,
          max_batch_size: 1000,
          heartbeat_s: 30,
          idle_timeout_s: 90,
        };
        ws.send(JSON.stringify(initAck));
      } else if (frame.type === "close") {
        ws.close(1000, "closed");
      }
    });
  }

  get port(): number {
    const addr = this.server.address();
    return typeof addr === "object" && addr ? addr.port : 0;
  }

  async close(): Promise<void> {
    for (const c of this.wss.clients) c.terminate();
    await new Promise<void>((r) => this.server.close(() => r()));
  }
}

async function listening<S extends Server | HttpsServer>(server: S): Promise<S> {
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", () => r()));
  return server;
}

describe("against a fake gateway", () => {
  let dir: string;
  let certs: Record<string, string>;
  let plain: FakeGateway;
  let tls: FakeGateway;

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "engram-ts-tls-"));
    certs = await py("certs", "--dir", dir);
    plain = new FakeGateway(await listening(createHttp()));
    const opts = { cert: readFileSync(certs.cert), key: readFileSync(certs.key) };
    tls = new FakeGateway(await listening(createHttps(opts)));
  });

  afterAll(async () => {
    await plain?.close();
    await tls?.close();
    rmSync(dir, { recursive: true, force: true });
  });

  const url = (g: FakeGateway, scheme = "ws") => `${scheme}://127.0.0.1:${g.port}/v1/stream`;

  it("sends the key as the handshake's Authorization header on Node, not in the init", async () => {
    const stream = await openStream({ url: url(plain), space: "ts-a-1", apiKey: KEY });
    await stream.close();
    const shake = plain.handshakes.at(-1)!;
    expect(shake.authorization).toBe(`Bearer ${KEY}`);
    expect(shake.init?.api_key).toBeUndefined();
  });

  it("sends the key in the init frame where headers cannot be set", async () => {
    const BrowserLike = class extends NodeWebSocket {
      constructor(address: string) {
        super(address); // like a browser's WebSocket: a URL, no headers
      }
    } as unknown as WebSocketCtor;
    const stream = await openStream({
      url: url(plain),
      space: "ts-a-1",
      apiKey: KEY,
      WebSocket: BrowserLike,
    });
    await stream.close();
    const shake = plain.handshakes.at(-1)!;
    expect(shake.authorization).toBeUndefined();
    expect(shake.init?.api_key).toBe(KEY);
  });

  it("connects over wss:// trusting the CA it is given, and no other", async () => {
    const stream = await openStream({
      url: url(tls, "wss"),
      space: "ts-a-1",
      apiKey: KEY,
      ca: readFileSync(certs.ca),
    });
    await stream.send({ vectors: [[1, 2, 3, 4]] });
    await stream.close();
    expect(tls.handshakes.at(-1)!.authorization).toBe(`Bearer ${KEY}`);

    const before = tls.handshakes.length;
    const err = await openStream({
      url: url(tls, "wss"),
      space: "ts-a-1",
      apiKey: KEY,
      reconnectTimeoutMs: 300,
    }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(EngramError);
    expect((err as EngramError).code).toBe("unavailable");
    expect(tls.handshakes.length).toBe(before); // the key never reached an untrusted server
  });

  it("fails at once with unauthenticated when the handshake is refused (401)", async () => {
    plain.refuse = 401;
    try {
      const before = plain.handshakes.length;
      const err = await openStream({
        url: url(plain),
        space: "ts-a-1",
        apiKey: KEY,
        reconnectTimeoutMs: 60_000,
      }).catch((e: unknown) => e);
      expect((err as EngramError).code).toBe("unauthenticated");
      expect((err as EngramError).retryable).toBe(false);
      expect(plain.handshakes.length).toBe(before + 1); // not retried
    } finally {
      plain.refuse = 0;
    }
  });

  it("resends a rate-limited batch after its retry-after", async () => {
    plain.batches.length = 0;
    plain.batchError = {
      code: "rate_limited",
      message: "over the key's limit",
      retryable: true,
      retry_after_ms: 50,
    };
    try {
      const kinds: string[] = [];
      const stream = await openStream({
        url: url(plain),
        space: "ts-a-1",
        apiKey: KEY,
        encoding: "json", // the fake reads the sequence number from JSON batches
        onEvent: (e) => kinds.push(e.kind),
      });
      const ack = await stream.send({ vectors: [[1, 2, 3, 4]] });
      await stream.close();
      expect(ack.sequenceNumber).toBe(1);
      expect(plain.batches).toEqual([1, 1]);
      expect(kinds.filter((k) => k === "rejected")).toHaveLength(1);
      expect(kinds).not.toContain("disconnected");
    } finally {
      plain.batchError = null;
    }
  });

  it("refuses a CA where it cannot be used", async () => {
    const err = await openStream({
      url: url(plain),
      space: "ts-a-1",
      ca: "pem",
      WebSocket: NodeWebSocket as unknown as WebSocketCtor,
    }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(TypeError);
  });
});

describe("against a cluster that asks for keys", () => {
  let cluster: Cluster;
  let dir: string;
  let writer: string;
  let other: string;

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "engram-ts-keys-"));
    const keysFile = join(dir, "keys.json");
    const scopes = ["--scope", "write:ts-auth-*", "--scope", "read:ts-auth-*"];
    writer = (await py("key", "--keys-file", keysFile, ...scopes)).key;
    other = (await py("key", "--keys-file", keysFile, "--scope", "write:ts-other-*")).key;
    cluster = await startCluster({ shards: 1, env: { ENGRAM_KEYS_FILE: keysFile } });
  });

  afterAll(async () => {
    await cluster?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  const url = () => `ws://127.0.0.1:${cluster.httpPort}/v1/stream`;

  it("writes and recalls with a key that covers the space", async () => {
    const spaceId = space("ts-auth");
    for (const WebSocket of [undefined, NodeWebSocket as unknown as WebSocketCtor]) {
      // header (Node) and init frame (a WebSocket without headers)
      const stream = await openStream({ url: url(), space: spaceId, apiKey: writer, WebSocket });
      const v = vectors(3, 8, WebSocket ? 2 : 1);
      await stream.send({ vectors: v, dim: 8 });
      const r = await stream.recall(v.subarray(0, 8), { k: 1, consistency: "session" });
      expect(r.results).toHaveLength(1);
      await stream.close();
    }
    const ids = await listSpace(spaceId, cluster.dataDir, writer);
    expect(ids).toHaveLength(6);
  });

  it("refuses a wrong key, no key, and a key for other spaces", async () => {
    const spaceId = space("ts-auth");
    const wrong = "ek_0123456789ab_" + "B".repeat(43);
    const noHeaders = NodeWebSocket as unknown as WebSocketCtor;
    const cases: Array<[string | undefined, string, WebSocketCtor | undefined]> = [
      [wrong, "unauthenticated", undefined], // in the header: HTTP 401
      [wrong, "unauthenticated", noHeaders], // in the init frame: an error frame, close 1008
      [undefined, "unauthenticated", undefined],
      [other, "permission_denied", undefined],
    ];
    for (const [apiKey, code, WebSocket] of cases) {
      const err = await openStream({
        url: url(),
        space: spaceId,
        apiKey,
        WebSocket,
        reconnectTimeoutMs: 60_000,
      }).catch((e: unknown) => e);
      expect(err, `${code} with ${apiKey?.slice(0, 16)}`).toBeInstanceOf(EngramError);
      expect((err as EngramError).code).toBe(code);
    }
  });
});
