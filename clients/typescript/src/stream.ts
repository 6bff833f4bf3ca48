/**
 * One session stream over WebSocket: batches, acks, statuses, recall, automatic resume.
 *
 * Every batch is kept until the server acknowledges it as durable. When the connection drops
 * (or the server asks for a resync) the stream reconnects with the same session id; the
 * server's `init_ack.initial_sequence` names the last durable sequence number, batches up to it
 * are settled, and the rest are resent in order: no duplicate, no gap. A batch the server
 * refuses for good (bad input) fails its own promise only; later batches are renumbered so the
 * session's sequence stays gap-free. A batch refused for now (`ack` with status `rejected`,
 * admission control) is resent with the same number after its `retry_after_ms`.
 *
 * `delete` forgets observations of the stream's space by id and/or time; the server applies it
 * after every batch sent before it is durable, so a stream can delete what it has just written.
 * A delete still unanswered when the connection drops is sent again after the resume (rows it
 * had deleted are then counted in `alreadyDeleted`).
 */

import type {
  AckFrame,
  DeletedFrame,
  ErrorFrame,
  FlowAction,
  InitAckFrame,
  MemoryJson,
  Priority,
  RecallMetadataJson,
  RecallResultFrame,
  ServerFrame,
  StatusFrame,
  Consistency,
} from "./frames.js";
import {
  encodeBatch,
  encodeBatchRequest,
  float32Bytes,
  int64Bytes,
  toBase64,
} from "./proto.js";
import {
  OPEN,
  resolveTransport,
  type CloseEventLike,
  type Transport,
  type WebSocketCtor,
  type WebSocketLike,
} from "./socket.js";

export interface StreamOptions {
  /** e.g. `ws://127.0.0.1:7432/v1/stream`, or `wss://...` where the gateway serves TLS */
  url: string;
  /** An API key (`ek_...`) for a gateway that asks for one. On Node it is sent as the
   * handshake's `Authorization: Bearer` header; in browsers (which cannot set headers) and with
   * a `WebSocket` of your own, in the init frame's `api_key`. */
  apiKey?: string;
  /** Node only: the PEM CA(s) a `wss://` gateway's certificate must chain to (default: Node's
   * own CAs). Browsers trust their own. */
  ca?: string | Uint8Array;
  /** Memory space id: 3-64 characters of [a-z0-9_-]. */
  space: string;
  /** Resume this session (opened over WebSocket or gRPC) instead of opening a new one. */
  sessionId?: string;
  /** How batches travel: protobuf binary frames (default) or JSON frames with base64 vectors. */
  encoding?: "binary" | "json";
  /** Called for connection changes, statuses, rejections, errors, heartbeats and acks. */
  onEvent?: (event: StreamEvent) => void;
  /** Give up (fail every pending batch) after being disconnected this long. Default 120 s. */
  reconnectTimeoutMs?: number;
  /** Longest wait for a connection's init_ack. Default 10 s. */
  connectTimeoutMs?: number;
  /** Interval of the client's heartbeat frames. Default: the server's (init_ack.heartbeat_s). */
  heartbeatMs?: number;
  /** Keep as many batches in flight as the credits allow while acks come back within this,
   * fewer when they do not (AIMD on ack latency). Default 50 ms; 0 always uses every credit. */
  targetLatencyMs?: number;
  /** A WebSocket implementation; default the global one, else the `ws` package. */
  WebSocket?: WebSocketCtor;
}

export interface BatchInput {
  /** n x dim values: a flat Float32Array (with `dim`) or one row per observation. */
  vectors: Float32Array | readonly (readonly number[] | Float32Array)[];
  dim?: number;
  ids?: readonly string[];
  contents?: readonly string[];
  confidences?: Float32Array | readonly number[];
  /** Observation times, unix microseconds. */
  timestampsUs?: readonly (number | bigint)[] | BigInt64Array;
  priority?: Priority;
}

export interface Ack {
  sequenceNumber: number;
  firstLsn: number;
  count: number;
  /** A resend of something already durable (also set for batches settled on resume). */
  duplicate: boolean;
  memoryId: string;
  committedAt?: string;
}

export interface Memory {
  id: string;
  content: string;
  score: number;
  confidence: number;
  when?: string;
  lsn: number;
}

export interface RecallOptions {
  k?: number;
  minScore?: number;
  consistency?: Consistency;
  deadlineMs?: number;
  sinceUs?: number;
  untilUs?: number;
  minConfidence?: number;
}

/** What to delete: ids and/or a time range `[since, until)` (either bound alone is open),
 * each bound as unix microseconds or as a Date / RFC 3339 string. */
export interface DeleteOptions {
  ids?: readonly string[];
  sinceUs?: number;
  untilUs?: number;
  since?: Date | string;
  until?: Date | string;
}

export interface DeleteResult {
  requestId: string;
  /** Observations this delete removed. */
  deleted: number;
  /** Named by id but deleted before. */
  alreadyDeleted: number;
  /** Ids the space does not hold (not an error). */
  notFound: number;
  /** The space's visible LSN the delete took effect at. */
  lsn: number;
  committedAt?: string;
}

export interface RecallResult {
  requestId: string;
  results: Memory[];
  snapshotSequence: number;
  metadata?: RecallMetadataJson;
}

export type StreamEvent =
  | { kind: "connected" | "resumed"; detail: string; sessionId: string; initialSequence: number }
  | { kind: "disconnected"; detail: string; closeCode?: number }
  | { kind: "status"; detail: string; status: StatusFrame }
  | { kind: "rejected"; detail: string; sequenceNumber: number; retryAfterMs: number }
  | { kind: "error"; detail: string; error?: ErrorFrame }
  | { kind: "heartbeat"; detail: string }
  | { kind: "ack"; detail: string; ack: Ack }
  | { kind: "closed"; detail: string };

/** An error of the protocol (`code` is the proto ErrorCode name in lower case) or the client. */
export class EngramError extends Error {
  readonly code: string;
  readonly retryable: boolean;
  readonly sequenceNumber: number;
  readonly requestId: string;
  readonly expectedSequence: number;
  /** With `rate_limited` / `overloaded`: when to try again. */
  readonly retryAfterMs: number;

  constructor(
    code: string,
    message: string,
    opts: {
      retryable?: boolean;
      sequenceNumber?: number;
      requestId?: string;
      expectedSequence?: number;
      retryAfterMs?: number;
    } = {},
  ) {
    super(`${code}: ${message}`);
    this.name = "EngramError";
    this.code = code;
    this.retryable = opts.retryable ?? false;
    this.sequenceNumber = opts.sequenceNumber ?? 0;
    this.requestId = opts.requestId ?? "";
    this.expectedSequence = opts.expectedSequence ?? 0;
    this.retryAfterMs = opts.retryAfterMs ?? 0;
  }

  static fromFrame(f: ErrorFrame): EngramError {
    return new EngramError(f.code, f.message, {
      retryable: f.retryable,
      sequenceNumber: f.sequence_number,
      requestId: f.request_id,
      expectedSequence: f.expected_sequence,
      retryAfterMs: f.retry_after_ms,
    });
  }
}

interface EncodedBatch {
  n: number;
  binary?: Uint8Array;
  json?: Record<string, unknown>;
}

interface Pending {
  batch: EncodedBatch;
  sentAt: number;
  promise: Promise<Ack>;
  resolve: (ack: Ack) => void;
  reject: (err: Error) => void;
}

interface RecallPending {
  frame: string;
  resolve: (r: RecallResult) => void;
  reject: (err: Error) => void;
}

interface DeletePending {
  requestId: string;
  frame: string;
  /** Not sent yet: a send called before it still waits for a credit. */
  held: boolean;
  resolve: (r: DeleteResult) => void;
  reject: (err: Error) => void;
}

interface Conn {
  ws: WebSocketLike;
  gen: number;
  closed: Promise<CloseEventLike>;
  finish: (info: CloseEventLike) => void;
}

type Timer = ReturnType<typeof setTimeout>;

const PRIORITY = { high: 1, normal: 2, low: 3 } as const;
// Close codes after which reconnecting cannot help: policy violation, frame too big.
const FATAL_CLOSE = new Set([1008, 1009]);
// Errors that end the stream whatever batch they answer: the key is not (or no longer) valid,
// or does not cover the space. Errors after which a batch is resent after its retry-after.
const FATAL_CODES = new Set(["unauthenticated", "permission_denied"]);
const RESEND_LATER = new Set(["rate_limited", "overloaded"]);
// How the `ws` package reports a handshake the server refused (HTTP 401/403 before upgrading).
const REFUSED_HANDSHAKE = /Unexpected server response: (401|403)/;
const CLIENT_TIMEOUT_CLOSE = 4000;

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));
const now = () => Date.now();

function unref(t: Timer): Timer {
  (t as { unref?: () => void }).unref?.();
  return t;
}

function hardClose(ws: WebSocketLike, code = 1000, reason = ""): void {
  try {
    ws.onopen = ws.onmessage = ws.onerror = null;
    if (ws.terminate) ws.terminate();
    else ws.close(code, reason);
  } catch {
    /* already closed */
  }
}

export class EngramStream {
  readonly space: string;
  readonly url: string;
  readonly encoding: "binary" | "json";
  /** Set by the first init_ack (or given to resume). */
  sessionId: string;
  dim = 0;
  lastAcked = 0;
  maxInFlight = 8;
  maxBatchSize = 10_000;
  maxFrameBytes = 64 * 1024 * 1024;
  reconnects = 0;
  rejections = 0;
  heartbeats = 0;
  /** The latest status frame (pushed backpressure changes, flow control answers). */
  status: StatusFrame | null = null;
  connected = false;

  private readonly opts: StreamOptions;
  private transport!: Transport;
  private conn: Conn | null = null;
  private gen = 0;
  private nextSeq = 1;
  private pending = new Map<number, Pending>();
  private reserved = 0;
  private waiters: Array<() => void> = [];
  private recalls = new Map<string, RecallPending>();
  private deletes = new Map<string, DeletePending>();
  private sendsCalled = 0; // send() calls so far
  private sendsQueued = 0; // of those, how many (in call order) are transmitted or failed
  private heldDeletes: { after: number; entry: DeletePending }[] = [];
  private rid = 0;
  private rejected = new Set<number>();
  private resendAt = 0;
  private resendTimer: Timer | null = null;
  private heartbeatTimer: Timer | null = null;
  private watchdogTimer: Timer | null = null;
  private lastRx = 0;
  private serverHeartbeatMs = 30_000;
  private closing = false;
  private closedPromise: Promise<void> | null = null;
  private fatal: EngramError | null = null;
  private firstDone = false;
  private firstResolve!: () => void;
  private firstReject!: (err: Error) => void;
  private resync = false;
  private readonly targetMs: number;
  private depth = 2; // latency-driven window (AIMD on ack latency)
  private ackLatencyMs = 0; // EWMA
  private runner: Promise<void> = Promise.resolve();
  private listeners = new Set<(e: StreamEvent) => void>();

  private constructor(opts: StreamOptions) {
    this.opts = opts;
    this.space = opts.space;
    this.url = opts.url;
    this.sessionId = opts.sessionId ?? "";
    this.encoding = opts.encoding ?? "binary";
    this.targetMs = opts.targetLatencyMs ?? 50;
    if (opts.onEvent) this.listeners.add(opts.onEvent);
  }

  /** Opens (or, with `sessionId`, resumes) a session; resolves once the server accepted it. */
  static async open(opts: StreamOptions): Promise<EngramStream> {
    const stream = new EngramStream(opts);
    await stream.start();
    return stream;
  }

  // ------------------------------------------------------------------ public

  /** Batches sent and not yet acknowledged. */
  get inFlight(): number {
    return this.pending.size;
  }

  /** Batches allowed in flight: the server's credits (half under backpressure; one when
   * overloaded or while refused batches wait for their retry-after), further held to the depth
   * that keeps acks within the latency target. */
  get window(): number {
    if (this.rejected.size > 0 || this.status?.state === "overloaded") return 1;
    let credits = this.maxInFlight;
    if (this.status?.state === "backpressure") credits = Math.max(1, Math.floor(credits / 2));
    if (this.targetMs <= 0) return credits;
    return Math.max(1, Math.min(credits, Math.floor(this.depth)));
  }

  /** Additive increase while acks are fast, multiplicative decrease when slow. */
  private adapt(latencyMs: number): void {
    const a = this.ackLatencyMs;
    this.ackLatencyMs = a === 0 ? latencyMs : 0.8 * a + 0.2 * latencyMs;
    if (this.ackLatencyMs > this.targetMs) {
      this.depth = Math.max(1, this.depth * 0.7);
    } else if (this.ackLatencyMs < this.targetMs / 2) {
      this.depth = Math.min(this.maxInFlight, this.depth + 1 / Math.max(1, this.depth));
    }
  }

  /** Adds a listener of stream events; returns a function that removes it. */
  on(listener: (e: StreamEvent) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /** Sends one batch (after waiting for a credit); resolves when it is durable. */
  async send(input: BatchInput): Promise<Ack> {
    const ticket = ++this.sendsCalled;
    try {
      this.throwIfUnusable();
      const batch = this.encode(input);
      await this.credit();
      this.reserved--;
      this.throwIfUnusable();
      const seq = this.nextSeq++;
      let resolve!: (a: Ack) => void;
      let reject!: (e: Error) => void;
      const promise = new Promise<Ack>((res, rej) => {
        resolve = res;
        reject = rej;
      });
      this.pending.set(seq, { batch, sentAt: now(), promise, resolve, reject });
      this.transmit(seq);
      return promise;
    } finally {
      this.queued(ticket);
    }
  }

  /** Resolves when a credit is free: `await stream.writable(); stream.send(b)` pipelines. */
  async writable(): Promise<void> {
    this.throwIfUnusable();
    await this.credit();
    this.reserved--;
    this.wake();
  }

  /** Waits until every batch sent so far is acknowledged or failed. */
  async flush(): Promise<void> {
    await Promise.allSettled([...this.pending.values()].map((p) => p.promise));
    if (this.fatal) throw this.fatal;
  }

  /** The k nearest memories of `cue` in this stream's space. */
  recall(cue: Float32Array | readonly number[], opts: RecallOptions = {}): Promise<RecallResult> {
    this.throwIfUnusable();
    const requestId = `r${++this.rid}`;
    const frame: Record<string, unknown> = {
      type: "recall",
      request_id: requestId,
      cue: Array.from(cue),
      k: opts.k ?? 10,
    };
    if (opts.minScore !== undefined) frame.min_score = opts.minScore;
    if (opts.consistency !== undefined) frame.consistency = opts.consistency;
    if (opts.deadlineMs !== undefined) frame.deadline_ms = opts.deadlineMs;
    if (opts.sinceUs !== undefined) frame.since_us = opts.sinceUs;
    if (opts.untilUs !== undefined) frame.until_us = opts.untilUs;
    if (opts.minConfidence !== undefined) frame.min_confidence = opts.minConfidence;
    const text = JSON.stringify(frame);
    return new Promise<RecallResult>((resolve, reject) => {
      this.recalls.set(requestId, { frame: text, resolve, reject });
      this.sendText(text);
    });
  }

  /** Deletes observations of this stream's space (needs `write` on it); resolves once the
   * delete is durable: no recall after that returns them. */
  delete(opts: DeleteOptions): Promise<DeleteResult> {
    this.throwIfUnusable();
    const requestId = `d${++this.rid}`;
    const frame = deleteFrame(requestId, opts);
    const text = JSON.stringify(frame);
    const after = this.sendsCalled; // the server orders it after those batches' acks
    return new Promise<DeleteResult>((resolve, reject) => {
      const entry = { requestId, frame: text, held: this.sendsQueued < after, resolve, reject };
      this.deletes.set(requestId, entry);
      if (!entry.held) this.sendText(text);
      else this.heldDeletes.push({ after, entry });
    });
  }

  /** Send `ticket` is on the wire (or failed): deletes called after it may go. */
  private queued(ticket: number): void {
    this.sendsQueued = Math.max(this.sendsQueued, ticket);
    while (this.heldDeletes.length && this.heldDeletes[0].after <= this.sendsQueued) {
      const { entry } = this.heldDeletes.shift()!;
      entry.held = false;
      if (this.deletes.has(entry.requestId)) this.sendText(entry.frame);
    }
  }

  /** Flow control (pause, resume, slow_down, speed_up, buffer_status); the server answers
   * with a `status` frame (see `status` and the "status" event). False when disconnected. */
  flowControl(
    action: FlowAction,
    opts: { preferredRate?: number; bufferRemaining?: number; reason?: string } = {},
  ): boolean {
    return this.sendText(
      JSON.stringify({
        type: "flow_control",
        action,
        preferred_rate: opts.preferredRate ?? 0,
        buffer_remaining: opts.bufferRemaining ?? 0,
        reason: opts.reason ?? "",
      }),
    );
  }

  /** Waits for outstanding acks, then closes the session's stream (the server drains too). */
  close(): Promise<void> {
    if (!this.closedPromise) this.closedPromise = this.doClose();
    return this.closedPromise;
  }

  // ------------------------------------------------------------------ connection

  private async start(): Promise<void> {
    this.transport = await resolveTransport({
      WebSocket: this.opts.WebSocket,
      apiKey: this.opts.apiKey,
      ca: this.opts.ca,
    });
    const first = new Promise<void>((resolve, reject) => {
      this.firstResolve = resolve;
      this.firstReject = reject;
    });
    this.runner = this.run().catch((err: unknown) =>
      this.failAll(new EngramError("internal", `client stream failed: ${String(err)}`)),
    );
    await first;
  }

  private async run(): Promise<void> {
    let backoff = 50;
    let downSince: number | null = null;
    const timeout = this.opts.reconnectTimeoutMs ?? 120_000;
    while (!this.closing && !this.fatal) {
      let conn: Conn;
      try {
        conn = await this.connect();
      } catch (err) {
        const e =
          err instanceof EngramError
            ? err
            : new EngramError("unavailable", String(err), { retryable: true });
        if (this.closing) return;
        if (!e.retryable || (downSince !== null && now() - downSince > timeout)) {
          this.failAll(e);
          return;
        }
        downSince ??= now();
        this.emit({ kind: "disconnected", detail: `connect failed: ${e.message}; retrying` });
        await sleep(backoff);
        backoff = Math.min(backoff * 2, 2000);
        continue;
      }
      if (!this.firstDone) {
        this.firstDone = true;
        this.firstResolve();
      }
      if (this.closing) {
        // close() ran while this connection was being opened: nothing is pending any more
        this.drop(1000, "closed", true);
        this.detach(conn);
        return;
      }
      backoff = 50;
      downSince = null;
      const info = await conn.closed;
      this.detach(conn);
      if (this.closing || this.fatal) return;
      if (FATAL_CLOSE.has(info.code)) {
        const code = info.code === 1009 ? "batch_too_large" : "policy_violation";
        this.failAll(new EngramError(code, `the server closed the connection: ${info.code} ${info.reason}`));
        return;
      }
      this.reconnects++;
      downSince = now();
      const resync = this.resync;
      this.resync = false;
      this.emit({
        kind: "disconnected",
        detail: `${resync ? "resync" : `closed ${info.code} ${info.reason}`.trim()}; resuming session ${this.sessionId}`,
        closeCode: info.code,
      });
      await sleep(resync ? 10 : backoff);
    }
  }

  private connect(): Promise<Conn> {
    return new Promise<Conn>((resolve, reject) => {
      const ws = this.transport.open(this.url);
      ws.binaryType = "arraybuffer";
      const gen = ++this.gen;
      let finished = false;
      let finishClosed!: (info: CloseEventLike) => void;
      const closed = new Promise<CloseEventLike>((r) => (finishClosed = r));
      const conn: Conn = {
        ws,
        gen,
        closed,
        finish: (info) => {
          if (!finished) {
            finished = true;
            finishClosed(info);
          }
        },
      };
      let settled = false;
      const fail = (err: EngramError) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        hardClose(ws);
        conn.finish({ code: 1006, reason: err.message });
        reject(err);
      };
      const timer = setTimeout(
        () =>
          fail(
            new EngramError("unavailable", "no init_ack in time", {
              retryable: true,
            }),
          ),
        this.opts.connectTimeoutMs ?? 10_000,
      );
      ws.onopen = () => {
        const init: Record<string, unknown> = {
          type: "init",
          memory_space_id: this.space,
          enable_backpressure: true,
        };
        if (this.sessionId) init.session_id = this.sessionId;
        if (this.opts.apiKey && !this.transport.keyInHeader) init.api_key = this.opts.apiKey;
        ws.send(JSON.stringify(init));
      };
      ws.onmessage = (ev) => {
        if (gen !== this.gen || typeof ev.data !== "string") return;
        this.lastRx = now();
        let frame: ServerFrame;
        try {
          frame = JSON.parse(ev.data) as ServerFrame;
        } catch {
          return;
        }
        if (!settled) {
          if (frame.type === "init_ack") {
            settled = true;
            clearTimeout(timer);
            this.onInitAck(conn, frame);
            resolve(conn);
          } else if (frame.type === "error") {
            fail(EngramError.fromFrame(frame));
          }
          return;
        }
        this.onFrame(frame);
      };
      let lastError = "";
      ws.onerror = (ev) => {
        lastError = String((ev as { message?: unknown })?.message ?? ""); // a close event follows
      };
      ws.onclose = (ev) => {
        const refused = REFUSED_HANDSHAKE.exec(lastError);
        fail(
          refused
            ? new EngramError(
                refused[1] === "401" ? "unauthenticated" : "permission_denied",
                `the gateway refused the handshake (HTTP ${refused[1]}): check the API key`,
              )
            : new EngramError(
                "unavailable",
                `connection closed before init_ack (${ev.code} ${ev.reason})`.trim(),
                { retryable: !FATAL_CLOSE.has(ev.code) },
              ),
        );
        conn.finish({ code: ev.code, reason: ev.reason });
      };
    });
  }

  private onInitAck(conn: Conn, ack: InitAckFrame): void {
    const resumed = Boolean(this.sessionId);
    this.sessionId = ack.session_id;
    this.dim = ack.dim || this.dim;
    this.maxInFlight = Math.max(1, ack.max_in_flight_batches || this.maxInFlight);
    this.maxBatchSize = ack.max_batch_size || this.maxBatchSize;
    this.maxFrameBytes = ack.max_frame_bytes || this.maxFrameBytes;
    if (ack.heartbeat_s) this.serverHeartbeatMs = ack.heartbeat_s * 1000;
    const durable = ack.initial_sequence;
    if (!this.firstDone) this.nextSeq = Math.max(this.nextSeq, durable + 1);
    for (const seq of [...this.pending.keys()].sort((a, b) => a - b)) {
      if (seq > durable) break;
      const p = this.pending.get(seq)!;
      this.pending.delete(seq);
      p.resolve({ sequenceNumber: seq, firstLsn: 0, count: 0, duplicate: true, memoryId: "" });
    }
    this.lastAcked = Math.max(this.lastAcked, durable);
    this.rejected.clear();
    this.conn = conn;
    this.connected = true;
    for (const seq of [...this.pending.keys()].sort((a, b) => a - b)) this.transmit(seq);
    for (const r of this.recalls.values()) this.sendText(r.frame);
    for (const d of this.deletes.values()) if (!d.held) this.sendText(d.frame); // after batches
    this.startTimers();
    this.wake();
    this.emit({
      kind: resumed ? "resumed" : "connected",
      detail: `session ${this.sessionId}, durable up to ${durable}`,
      sessionId: this.sessionId,
      initialSequence: durable,
    });
  }

  /** Ends the current connection now (its later events are ignored). */
  private drop(code: number, reason: string, graceful: boolean): void {
    const conn = this.conn;
    if (!conn) return;
    this.gen++;
    if (graceful) {
      try {
        conn.ws.close(code, reason);
      } catch {
        hardClose(conn.ws);
      }
    } else {
      hardClose(conn.ws, code, reason);
    }
    conn.finish({ code, reason });
  }

  private detach(conn: Conn): void {
    if (this.conn === conn) {
      this.conn = null;
      this.connected = false;
    }
    if (this.heartbeatTimer) clearInterval(this.heartbeatTimer);
    if (this.watchdogTimer) clearInterval(this.watchdogTimer);
    this.heartbeatTimer = this.watchdogTimer = null;
  }

  private startTimers(): void {
    const every = this.opts.heartbeatMs ?? this.serverHeartbeatMs;
    this.heartbeatTimer = unref(
      setInterval(() => this.sendText('{"type":"heartbeat"}'), Math.max(50, every)),
    );
    // No frame for 2.5 server heartbeats (+1 s): the connection is dead even if TCP says not.
    const deadAfter = this.serverHeartbeatMs * 2.5 + 1000;
    this.lastRx = now();
    this.watchdogTimer = unref(
      setInterval(
        () => {
          if (now() - this.lastRx > deadAfter) {
            this.drop(CLIENT_TIMEOUT_CLOSE, "no frame from the server", false);
          }
        },
        Math.min(1000, Math.max(50, this.serverHeartbeatMs / 2)),
      ),
    );
  }

  private sendText(text: string): boolean {
    const ws = this.conn?.ws;
    if (!ws || ws.readyState !== OPEN) return false;
    try {
      ws.send(text);
      return true;
    } catch {
      return false; // the reconnect resends what matters
    }
  }

  // ------------------------------------------------------------------ frames

  private onFrame(frame: ServerFrame): void {
    switch (frame.type) {
      case "ack":
        if (frame.status === "rejected") this.onRejected(frame);
        else this.settle(frame);
        break;
      case "recall_result":
        this.onRecall(frame);
        break;
      case "deleted":
        this.onDeleted(frame);
        break;
      case "error":
        this.onError(frame);
        break;
      case "status":
        this.status = frame;
        this.emit({ kind: "status", detail: `${frame.state}: ${frame.message}`, status: frame });
        this.wake();
        break;
      case "heartbeat":
        this.heartbeats++;
        this.emit({ kind: "heartbeat", detail: frame.timestamp });
        break;
      default:
        break;
    }
  }

  private settle(frame: AckFrame): void {
    const seq = frame.sequence_number;
    const p = this.pending.get(seq);
    this.pending.delete(seq);
    this.rejected.delete(seq);
    this.lastAcked = Math.max(this.lastAcked, seq);
    const ack: Ack = {
      sequenceNumber: seq,
      firstLsn: frame.first_lsn,
      count: frame.count,
      duplicate: frame.duplicate,
      memoryId: frame.memory_id,
      committedAt: frame.committed_at,
    };
    if (p) {
      if (!frame.duplicate) this.adapt(now() - p.sentAt);
      p.resolve(ack);
      this.emit({ kind: "ack", detail: `batch ${seq} durable`, ack });
    }
    this.wake();
  }

  private onRejected(frame: AckFrame): void {
    const seq = frame.sequence_number;
    if (!this.pending.has(seq)) return;
    this.rejections++;
    this.rejected.add(seq);
    this.resendAt = Math.max(this.resendAt, now() + frame.retry_after_ms);
    this.emit({
      kind: "rejected",
      detail: `batch ${seq}: ${frame.message ?? "refused"}; retry in ${frame.retry_after_ms} ms`,
      sequenceNumber: seq,
      retryAfterMs: frame.retry_after_ms,
    });
    this.scheduleResend();
  }

  private scheduleResend(): void {
    if (this.resendTimer) return;
    this.resendTimer = setTimeout(
      () => {
        this.resendTimer = null;
        if (this.closing && this.pending.size === 0) return;
        if (now() < this.resendAt) {
          this.scheduleResend();
          return;
        }
        if (!this.conn) return; // the reconnect resends everything pending
        const seqs = [...this.rejected].filter((s) => this.pending.has(s)).sort((a, b) => a - b);
        this.rejected.clear();
        for (const s of seqs) this.transmit(s);
        this.wake();
      },
      Math.max(0, this.resendAt - now()),
    );
  }

  private onRecall(frame: RecallResultFrame): void {
    const entry = this.recalls.get(frame.request_id);
    if (!entry) return;
    this.recalls.delete(frame.request_id);
    entry.resolve({
      requestId: frame.request_id,
      results: frame.results.map((m: MemoryJson) => ({ ...m })),
      snapshotSequence: frame.snapshot_sequence,
      metadata: frame.metadata,
    });
  }

  private onDeleted(frame: DeletedFrame): void {
    const entry = this.deletes.get(frame.request_id);
    if (!entry) return;
    this.deletes.delete(frame.request_id);
    entry.resolve({
      requestId: frame.request_id,
      deleted: frame.deleted,
      alreadyDeleted: frame.already_deleted,
      notFound: frame.not_found,
      lsn: frame.lsn,
      committedAt: frame.committed_at,
    });
  }

  private onError(frame: ErrorFrame): void {
    const err = EngramError.fromFrame(frame);
    if (frame.request_id) {
      const entry = this.recalls.get(frame.request_id) ?? this.deletes.get(frame.request_id);
      if (entry) {
        this.recalls.delete(frame.request_id);
        this.deletes.delete(frame.request_id);
        entry.reject(err);
      }
      return;
    }
    this.emit({ kind: "error", detail: `${frame.code}: ${frame.message}`, error: frame });
    if (FATAL_CODES.has(frame.code)) {
      this.failAll(err);
      return;
    }
    const seq = frame.sequence_number;
    if (seq === 0 || !this.pending.has(seq)) {
      if (frame.code === "unknown_session") this.failAll(err);
      return;
    }
    if (RESEND_LATER.has(frame.code)) {
      // like a rejected ack: the same number again after the retry-after
      this.onRejected({
        ...frame,
        type: "ack",
        status: "rejected",
        memory_id: "",
        first_lsn: 0,
        count: 0,
        duplicate: false,
        retry_after_ms: frame.retry_after_ms || 100,
      });
      return;
    }
    if (frame.code === "sequence_gap" || frame.retryable) {
      this.requestResync();
      return;
    }
    // refused for good: fail this batch only, renumber the later ones, resync
    const failed = this.pending.get(seq)!;
    this.pending.delete(seq);
    failed.reject(err);
    const renumbered = new Map<number, Pending>();
    for (const [s, p] of [...this.pending.entries()].sort((a, b) => a[0] - b[0])) {
      renumbered.set(s > seq ? s - 1 : s, p);
    }
    this.pending = renumbered;
    this.rejected.clear();
    this.nextSeq -= 1;
    this.requestResync();
    this.wake();
  }

  /** Reconnect at once: the server's durable mark decides what to resend. */
  private requestResync(): void {
    if (this.resync || !this.conn) return;
    this.resync = true;
    this.drop(1000, "resync", true);
  }

  // ------------------------------------------------------------------ batches

  private encode(input: BatchInput): EncodedBatch {
    let dim: number;
    let flat: Float32Array;
    if (input.vectors instanceof Float32Array) {
      dim = input.dim ?? this.dim;
      if (!dim) throw new TypeError("a flat Float32Array of vectors needs `dim`");
      if (input.vectors.length % dim !== 0) {
        throw new TypeError(`${input.vectors.length} values are not a whole number of ${dim}-d vectors`);
      }
      flat = input.vectors;
    } else {
      const rows = input.vectors;
      if (rows.length === 0) throw new TypeError("a batch needs at least one vector");
      dim = rows[0].length;
      flat = new Float32Array(rows.length * dim);
      rows.forEach((row, i) => {
        if (row.length !== dim) {
          throw new TypeError(`vector ${i} has ${row.length} values, the first has ${dim}`);
        }
        flat.set(row, i * dim);
      });
    }
    const n = dim ? flat.length / dim : 0;
    if (n > this.maxBatchSize) {
      throw new EngramError(
        "batch_too_large",
        `${n} observations exceed the server's ${this.maxBatchSize} per batch: split the batch`,
      );
    }
    const vectors = float32Bytes(flat);
    const confidences = input.confidences ? float32Bytes(input.confidences) : undefined;
    const timestamps = input.timestampsUs ? int64Bytes(input.timestampsUs) : undefined;
    const priority = input.priority ? PRIORITY[input.priority] : 0;
    const out: EncodedBatch = { n };
    if (this.encoding === "binary") {
      out.binary = encodeBatch({
        dim,
        vectors,
        ids: input.ids,
        contents: input.contents,
        confidences,
        timestampsUs: timestamps,
        priority,
      });
      if (out.binary.length + 256 > this.maxFrameBytes) {
        throw new EngramError(
          "batch_too_large",
          `the batch is ${out.binary.length} bytes; frames are limited to ${this.maxFrameBytes}`,
        );
      }
    } else {
      const json: Record<string, unknown> = { dim, vectors_b64: toBase64(vectors) };
      if (input.ids) json.ids = [...input.ids];
      if (input.contents) json.contents = [...input.contents];
      if (input.confidences) json.confidences = Array.from(input.confidences);
      if (input.timestampsUs) json.timestamps_us = Array.from(input.timestampsUs, (t) => Number(t));
      if (input.priority) json.priority = input.priority;
      out.json = json;
    }
    return out;
  }

  private transmit(seq: number): void {
    const p = this.pending.get(seq);
    const ws = this.conn?.ws;
    if (!p || !ws || ws.readyState !== OPEN) return;
    p.sentAt = now();
    try {
      if (p.batch.binary) {
        ws.send(encodeBatchRequest(this.space, this.sessionId, seq, p.batch.binary));
      } else {
        ws.send(
          JSON.stringify({
            type: "batch",
            memory_space_id: this.space,
            session_id: this.sessionId,
            sequence_number: seq,
            ...p.batch.json,
          }),
        );
      }
    } catch {
      /* the reconnect resends it */
    }
  }

  // ------------------------------------------------------------------ credits

  private credit(): Promise<void> {
    if (this.waiters.length === 0 && this.pending.size + this.reserved < this.window) {
      this.reserved++;
      return Promise.resolve();
    }
    return new Promise<void>((resolve) => this.waiters.push(resolve));
  }

  private wake(): void {
    while (
      this.waiters.length > 0 &&
      (this.fatal || this.closing || this.pending.size + this.reserved < this.window)
    ) {
      this.reserved++;
      this.waiters.shift()!();
    }
  }

  // ------------------------------------------------------------------ ending

  private throwIfUnusable(): void {
    if (this.fatal) throw this.fatal;
    if (this.closing) throw new EngramError("closed", "the stream is closed");
  }

  private failAll(err: EngramError): void {
    if (this.fatal) return;
    this.fatal = err;
    if (!this.firstDone) {
      this.firstDone = true;
      this.firstReject(err);
    }
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
    for (const r of this.recalls.values()) r.reject(err);
    this.recalls.clear();
    for (const d of this.deletes.values()) d.reject(err);
    this.deletes.clear();
    this.wake();
    this.emit({ kind: "error", detail: err.message });
    this.drop(1000, "client gave up", true);
  }

  private async doClose(): Promise<void> {
    try {
      await this.flush();
    } catch {
      /* failed batches already rejected their promises */
    }
    this.closing = true;
    if (this.resendTimer) clearTimeout(this.resendTimer);
    this.wake();
    const conn = this.conn;
    if (conn && this.sendText('{"type":"close","drain_queue":true}')) {
      // the server answers every forwarded batch, sends a closed status and closes with 1000
      let timer: Timer | undefined;
      await Promise.race([conn.closed, new Promise<void>((r) => (timer = setTimeout(r, 5000)))]);
      clearTimeout(timer);
    }
    this.drop(1000, "closed", true);
    const closedErr = new EngramError("closed", "the stream was closed");
    for (const r of this.recalls.values()) r.reject(closedErr);
    this.recalls.clear();
    for (const p of this.pending.values()) p.reject(closedErr);
    this.pending.clear();
    await this.runner;
    this.emit({ kind: "closed", detail: `session ${this.sessionId} closed` });
  }

  private emit(event: StreamEvent): void {
    for (const listener of this.listeners) {
      try {
        listener(event);
      } catch {
        /* a listener's bug must not break the stream */
      }
    }
  }
}

/** Shorthand for `EngramStream.open(opts)`. */
export function openStream(opts: StreamOptions): Promise<EngramStream> {
  return EngramStream.open(opts);
}

/** One delete in `opts.space` on a stream of its own (opened, used, closed). Dropping a space
 * and setting its retention are administrative calls of the gRPC service, not of this client. */
export async function deleteObservations(
  opts: StreamOptions & DeleteOptions,
): Promise<DeleteResult> {
  const stream = await EngramStream.open(opts);
  try {
    return await stream.delete(opts);
  } finally {
    await stream.close();
  }
}

function deleteFrame(requestId: string, opts: DeleteOptions): Record<string, unknown> {
  const frame: Record<string, unknown> = { type: "delete", request_id: requestId };
  if (opts.ids?.length) frame.ids = [...opts.ids];
  for (const name of ["since", "until"] as const) {
    const us = opts[`${name}Us`];
    const time = opts[name];
    if (us !== undefined && time !== undefined) {
      throw new EngramError("invalid_argument", `give ${name} or ${name}Us, not both`);
    }
    if (us !== undefined) frame[`${name}_us`] = us;
    if (time !== undefined) frame[name] = time instanceof Date ? time.toISOString() : time;
  }
  if (Object.keys(frame).length === 2) {
    throw new EngramError("invalid_argument", "a delete names ids, or a time range (since/until)");
  }
  return frame;
}
