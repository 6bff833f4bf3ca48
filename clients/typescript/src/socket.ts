/**
 * The WebSocket implementation: the global one in browsers (and Node 22+), the `ws` package in
 * Node 20. Only the browser-style surface below is used, which both provide.
 *
 * An API key and a CA: on Node the `ws` package is used whenever either is given (the global
 * WebSocket of Node 22 can set neither), the key goes as the handshake's `Authorization: Bearer`
 * header and the CA is the one trusted for `wss://`. Browsers cannot set headers (the key then
 * travels in the init frame) and trust their own CAs.
 */

export interface MessageEventLike {
  data: unknown;
}

export interface CloseEventLike {
  code: number;
  reason: string;
}

export interface WebSocketLike {
  readonly readyState: number;
  binaryType: string;
  readonly bufferedAmount: number;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: MessageEventLike) => void) | null;
  onclose: ((ev: CloseEventLike) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  send(data: string | Uint8Array | ArrayBuffer): void;
  close(code?: number, reason?: string): void;
  /** `ws` only: drop the TCP connection without a closing handshake. */
  terminate?: () => void;
}

export type WebSocketCtor = new (url: string) => WebSocketLike;

export const OPEN = 1;

/** How connections are opened, and whether the key already went in the handshake. */
export interface Transport {
  open(url: string): WebSocketLike;
  keyInHeader: boolean;
}

export interface TransportOptions {
  WebSocket?: WebSocketCtor;
  apiKey?: string;
  ca?: string | Uint8Array;
}

const isNode = (): boolean =>
  typeof (globalThis as { process?: { versions?: { node?: string } } }).process?.versions?.node ===
  "string";

type NodeWsCtor = new (
  url: string,
  opts: { headers?: Record<string, string>; ca?: string | Uint8Array },
) => WebSocketLike;

export async function resolveTransport(opts: TransportOptions): Promise<Transport> {
  if (opts.ca !== undefined && (opts.WebSocket || !isNode())) {
    throw new TypeError(
      "`ca` is for Node's `ws` transport: a browser trusts its own CAs, and a WebSocket " +
        "implementation of your own takes its TLS settings itself",
    );
  }
  if (!opts.WebSocket && isNode() && (opts.apiKey || opts.ca !== undefined)) {
    const Ws = (await nodeWs()) as unknown as NodeWsCtor;
    const headers: Record<string, string> = {};
    if (opts.apiKey) headers.Authorization = `Bearer ${opts.apiKey}`;
    const ca = opts.ca;
    return {
      open: (url) => new Ws(url, ca === undefined ? { headers } : { headers, ca }),
      keyInHeader: Boolean(opts.apiKey),
    };
  }
  const ctor = await resolveWebSocket(opts.WebSocket);
  return { open: (url) => new ctor(url), keyInHeader: false };
}

async function nodeWs(): Promise<WebSocketCtor> {
  const mod = (await import("ws")) as unknown as {
    WebSocket?: WebSocketCtor;
    default?: WebSocketCtor;
  };
  const ctor = mod.WebSocket ?? mod.default;
  if (!ctor) throw new Error("no WebSocket implementation: install the `ws` package");
  return ctor;
}

let cached: WebSocketCtor | undefined;

export async function resolveWebSocket(explicit?: WebSocketCtor): Promise<WebSocketCtor> {
  if (explicit) return explicit;
  if (cached) return cached;
  const global = (globalThis as { WebSocket?: WebSocketCtor }).WebSocket;
  if (global) {
    cached = global;
    return global;
  }
  // Node 20 has no global WebSocket: use the `ws` package (a dependency of this one).
  cached = await nodeWs();
  return cached;
}
