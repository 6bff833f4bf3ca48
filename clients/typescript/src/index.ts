/**
 * @engram/stream-client: Engram Stream over WebSocket, for browsers and Node 20.
 *
 * ```ts
 * import { openStream } from "@engram/stream-client";
 * const stream = await openStream({ url: "ws://127.0.0.1:7432/v1/stream", space: "agent-1" });
 * const ack = await stream.send({ vectors: embeddings, dim: 384 }); // n x 384, durable
 * const { results } = await stream.recall(cue, { k: 5, consistency: "session" });
 * await stream.delete({ ids: ["obs-1"] }); // durable once it resolves
 * await stream.close();
 * ```
 */

export {
  EngramError,
  EngramStream,
  deleteObservations,
  openStream,
  type Ack,
  type BatchInput,
  type DeleteOptions,
  type DeleteResult,
  type Memory,
  type RecallOptions,
  type RecallResult,
  type StreamEvent,
  type StreamOptions,
} from "./stream.js";
export type * from "./frames.js";
export {
  encodeBatch,
  encodeBatchRequest,
  float32Bytes,
  int64Bytes,
  toBase64,
  type BatchFields,
} from "./proto.js";
export type { WebSocketCtor, WebSocketLike } from "./socket.js";
