/**
 * The JSON frames of the WebSocket protocol (docs/websocket.md), as TypeScript types.
 *
 * Field names are the proto's (snake_case); enum values are the proto's names in lower case;
 * 64-bit integers are JSON numbers; timestamps are RFC 3339 strings (UTC).
 */

/** Fields every server frame but `heartbeat` carries. */
export interface ServerEnvelope {
  session_id: string;
  sequence_number: number;
  server_timestamp: string;
}

export interface Capabilities {
  max_observations_per_second: number;
  queue_capacity: number;
  supports_backpressure: boolean;
  supports_snapshot_isolation: boolean;
}

export interface InitAckFrame extends ServerEnvelope {
  type: "init_ack";
  initial_sequence: number;
  capabilities?: Capabilities;
  max_in_flight_batches: number;
  max_batch_size: number;
  dim: number;
  resumed: boolean;
  /** WebSocket only: the server's heartbeat interval; clients send theirs at this pace. */
  heartbeat_s: number;
  /** WebSocket only: silence after which the server closes the connection (1008). */
  idle_timeout_s: number;
  /** WebSocket only: larger frames close the connection (1009). */
  max_frame_bytes: number;
}

export type AckStatus = "status_unspecified" | "accepted" | "indexed" | "rejected";

export interface AckFrame extends ServerEnvelope {
  type: "ack";
  status: AckStatus;
  memory_id: string;
  committed_at?: string;
  first_lsn: number;
  count: number;
  duplicate: boolean;
  retry_after_ms: number;
  message?: string;
}

export type StreamState =
  | "state_unspecified"
  | "active"
  | "paused"
  | "backpressure"
  | "overloaded"
  | "error"
  | "closed";

export interface StatusFrame extends ServerEnvelope {
  type: "status";
  state: StreamState;
  message: string;
  queue_depth: number;
  queue_capacity: number;
  pressure: number;
  last_acked_sequence: number;
  level?: string;
  recommended_batch_size?: number;
  preferred_rate?: number;
  retry_after_ms?: number;
}

export type Consistency = "eventual" | "bounded" | "session" | "strong";

export interface MemoryJson {
  id: string;
  content: string;
  score: number;
  confidence: number;
  when?: string;
  lsn: number;
}

export interface RecallMetadataJson {
  latency_us: number;
  indexed_count: number;
  fresh_count: number;
  consistency: string;
  waited_us: number;
  staleness_us: number;
  chunk_index: number;
}

export interface RecallResultFrame extends ServerEnvelope {
  type: "recall_result";
  request_id: string;
  results: MemoryJson[];
  more_results: boolean;
  snapshot_sequence: number;
  metadata?: RecallMetadataJson;
}

/** The answer to a `delete` frame, once the delete is durable. */
export interface DeletedFrame extends ServerEnvelope {
  type: "deleted";
  request_id: string;
  /** Observations this delete removed. */
  deleted: number;
  /** Named by id but deleted before. */
  already_deleted: number;
  /** Ids the space does not hold. */
  not_found: number;
  /** The space's visible LSN the delete took effect at. */
  lsn: number;
  committed_at?: string;
}

/** The proto ErrorCode names in lower case (a newer server may send others). */
export type ErrorCode =
  | "malformed_message"
  | "not_initialized"
  | "already_initialized"
  | "invalid_space_id"
  | "space_mismatch"
  | "unknown_session"
  | "sequence_gap"
  | "empty_batch"
  | "wrong_dimension"
  | "bad_vector_blob"
  | "length_mismatch"
  | "non_finite_value"
  | "zero_vector"
  | "batch_too_large"
  | "k_out_of_range"
  | "invalid_argument"
  | "missing_operation"
  | "credits_exceeded"
  | "stream_paused"
  /** No API key, or one that is unknown, revoked or expired: not retried. */
  | "unauthenticated"
  /** The key does not cover this memory space for this operation: not retried. */
  | "permission_denied"
  /** The space was dropped while this stream used it; a new session starts it empty. */
  | "space_dropped"
  | "shard_unavailable"
  | "not_owner"
  | "overloaded"
  | "storage_failure"
  | "internal"
  | "consistency_timeout"
  /** The key's observations/s or recalls/s limit: retry after `retry_after_ms`. */
  | "rate_limited";

export interface ErrorFrame extends ServerEnvelope {
  type: "error";
  /** The proto ErrorCode name in lower case, e.g. "wrong_dimension", "sequence_gap". */
  code: ErrorCode | (string & {});
  message: string;
  expected_sequence: number;
  retryable: boolean;
  retry_after_ms: number;
  request_id: string;
}

export interface HeartbeatFrame {
  type: "heartbeat";
  session_id: string | null;
  timestamp: string;
  last_acked_sequence: number;
}

export type ServerFrame =
  | InitAckFrame
  | AckFrame
  | StatusFrame
  | RecallResultFrame
  | DeletedFrame
  | ErrorFrame
  | HeartbeatFrame;

export type FlowAction = "pause" | "resume" | "slow_down" | "speed_up" | "buffer_status";

export type Priority = "high" | "normal" | "low";
