/**
 * Just enough protobuf to write `engram.v1.ObservationRequest` with a batch: the binary frame
 * of the WebSocket protocol, byte for byte what a gRPC client sends. No dependency.
 *
 *   ObservationRequest { memory_space_id = 1; batch = 6; session_id = 10; sequence_number = 11 }
 *   ObservationBatch   { dim = 1; vectors = 2; ids = 3; contents = 4; confidences = 5;
 *                        timestamps_us = 6; priority = 7 }
 */

const utf8 = new TextEncoder();

const VARINT = 0;
const LEN = 2;

class Writer {
  private buf = new Uint8Array(256);
  private pos = 0;

  private reserve(n: number): void {
    if (this.pos + n <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.pos + n) size *= 2;
    const next = new Uint8Array(size);
    next.set(this.buf.subarray(0, this.pos));
    this.buf = next;
  }

  varint(value: number): this {
    if (!Number.isSafeInteger(value) || value < 0) {
      throw new RangeError(`not a non-negative safe integer: ${value}`);
    }
    this.reserve(10);
    let v = value;
    while (v >= 0x80) {
      this.buf[this.pos++] = (v % 0x80) | 0x80;
      v = Math.floor(v / 0x80);
    }
    this.buf[this.pos++] = v;
    return this;
  }

  tag(field: number, wire: number): this {
    return this.varint(field * 8 + wire);
  }

  bytes(field: number, data: Uint8Array): this {
    this.tag(field, LEN).varint(data.length);
    this.reserve(data.length);
    this.buf.set(data, this.pos);
    this.pos += data.length;
    return this;
  }

  string(field: number, text: string): this {
    return this.bytes(field, utf8.encode(text));
  }

  uint(field: number, value: number): this {
    return this.tag(field, VARINT).varint(value);
  }

  finish(): Uint8Array {
    return this.buf.slice(0, this.pos);
  }
}

export interface BatchFields {
  dim: number;
  vectors: Uint8Array; // n * dim little-endian float32
  ids?: readonly string[];
  contents?: readonly string[];
  confidences?: Uint8Array; // n little-endian float32
  timestampsUs?: Uint8Array; // n little-endian int64
  priority?: number; // 0 unspecified, 1 high, 2 normal, 3 low
}

/** Serialized ObservationBatch (field 6 of the request). */
export function encodeBatch(b: BatchFields): Uint8Array {
  const w = new Writer();
  if (b.dim) w.uint(1, b.dim);
  if (b.vectors.length) w.bytes(2, b.vectors);
  for (const id of b.ids ?? []) w.string(3, id);
  for (const c of b.contents ?? []) w.string(4, c);
  if (b.confidences?.length) w.bytes(5, b.confidences);
  if (b.timestampsUs?.length) w.bytes(6, b.timestampsUs);
  if (b.priority) w.uint(7, b.priority);
  return w.finish();
}

/** Serialized ObservationRequest carrying an already encoded batch. */
export function encodeBatchRequest(
  space: string,
  sessionId: string,
  sequenceNumber: number,
  batch: Uint8Array,
): Uint8Array {
  const w = new Writer();
  if (space) w.string(1, space);
  w.bytes(6, batch);
  if (sessionId) w.string(10, sessionId);
  if (sequenceNumber) w.uint(11, sequenceNumber);
  return w.finish();
}

/** Little-endian bytes of float32 values (a copy; JS typed arrays use the host's order). */
export function float32Bytes(values: Float32Array | readonly number[]): Uint8Array {
  const out = new Uint8Array(values.length * 4);
  const view = new DataView(out.buffer);
  for (let i = 0; i < values.length; i++) view.setFloat32(i * 4, values[i], true);
  return out;
}

/** Little-endian bytes of int64 values given as numbers or bigints. */
export function int64Bytes(values: readonly (number | bigint)[] | BigInt64Array): Uint8Array {
  const out = new Uint8Array(values.length * 8);
  const view = new DataView(out.buffer);
  for (let i = 0; i < values.length; i++) view.setBigInt64(i * 8, BigInt(values[i]), true);
  return out;
}

export function toBase64(bytes: Uint8Array): string {
  const B = (globalThis as { Buffer?: { from(b: Uint8Array): { toString(enc: string): string } } })
    .Buffer;
  if (B) return B.from(bytes).toString("base64");
  let binary = "";
  const chunk = 0x8000;
  for (let i = 0; i < bytes.length; i += chunk) {
    binary += String.fromCharCode(...bytes.subarray(i, i + chunk));
  }
  return btoa(binary);
}
