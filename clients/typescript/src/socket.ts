/**
 * The WebSocket implementation: the global one in browsers (and Node 22+), the `ws` package in
 * Node 20. Only the browser-style surface below is used, which both provide.
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
  const mod = (await import("ws")) as unknown as {
    WebSocket?: WebSocketCtor;
    default?: WebSocketCtor;
  };
  const ctor = mod.WebSocket ?? mod.default;
  if (!ctor) throw new Error("no WebSocket implementation: install the `ws` package");
  cached = ctor;
  return ctor;
}
