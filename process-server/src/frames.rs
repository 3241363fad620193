//! Reading an agent's frames within a memory budget.
//!
//! Invariants:
//! * A frame's header is read and checked (type, size bound) before anything else of it;
//!   then memory for the whole frame (twice its length: the raw bytes the journal takes
//!   and the decoded message) is reserved from its connection's budget and the server's,
//!   and only then is its body read off the QUIC stream. A peer that sends faster than
//!   the journal absorbs is held back by QUIC flow control, not buffered.
//! * The reservation travels with the frame ([`Received::budget`]) and is released when
//!   the frame has been journaled (or dropped), so the bytes a connection holds in memory
//!   are bounded by [`CONNECTION_BUDGET`] plus its QUIC receive window, and the whole
//!   server's by `max-inflight-mib` plus the windows of the connections it admits.
//! * [`CONNECTION_BUDGET`] holds at least one largest frame, so no frame waits forever.

use std::sync::Arc;

use anyhow::{Context as _, bail};
use quinn::RecvStream;
use ripcord_proto::{
    Message, decode_frame,
    wire::{HEADER_LEN, MAX_FRAME_LEN, decode_header},
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes of frames one connection may hold in memory at once.
pub const CONNECTION_BUDGET: usize = 40 << 20;
const _: () = assert!(CONNECTION_BUDGET >= 2 * MAX_FRAME_LEN);

/// The memory a connection's frames may use: its own share, within the server's.
#[derive(Clone)]
pub struct Budget {
    connection: Arc<Semaphore>,
    server: Arc<Semaphore>,
}

/// Memory reserved for one frame until it is dropped.
pub struct Reserved {
    _connection: OwnedSemaphorePermit,
    _server: OwnedSemaphorePermit,
}

impl Budget {
    /// A new connection's budget within the server-wide `server` semaphore (whose permits
    /// are bytes, and which must hold at least [`CONNECTION_BUDGET`]).
    pub fn for_connection(server: &Arc<Semaphore>) -> Budget {
        Budget {
            connection: Arc::new(Semaphore::new(CONNECTION_BUDGET)),
            server: Arc::clone(server),
        }
    }

    /// Waits until `bytes` are available in both budgets, and reserves them.
    async fn reserve(&self, bytes: usize) -> anyhow::Result<Reserved> {
        let n = u32::try_from(bytes).context("frame larger than 4 GiB")?;
        let connection = Arc::clone(&self.connection).acquire_many_owned(n).await?;
        let server = Arc::clone(&self.server).acquire_many_owned(n).await?;
        Ok(Reserved {
            _connection: connection,
            _server: server,
        })
    }
}

/// One frame, decoded, with its raw bytes (what the journal stores) and its reservation.
pub struct Received {
    pub msg: Message,
    pub raw: Vec<u8>,
    pub budget: Reserved,
}

/// Frame reader over a QUIC receive stream; see the module doc.
pub struct FrameReader {
    recv: RecvStream,
    budget: Budget,
}

impl FrameReader {
    pub fn new(recv: RecvStream, budget: Budget) -> Self {
        FrameReader { recv, budget }
    }

    /// Appends bytes from the stream to `buf` until it holds `len`. `false` if the stream
    /// ended before `buf` got any byte.
    async fn fill(&mut self, buf: &mut Vec<u8>, len: usize) -> anyhow::Result<bool> {
        while buf.len() < len {
            match self.recv.read_chunk(len - buf.len(), true).await? {
                Some(chunk) => buf.extend_from_slice(&chunk.bytes),
                None if buf.is_empty() => return Ok(false),
                None => bail!("stream ended inside a frame ({} of {len} bytes)", buf.len()),
            }
        }
        Ok(true)
    }

    /// The next frame; `None` at the end of the stream.
    pub async fn next(&mut self) -> anyhow::Result<Option<Received>> {
        let mut buf = Vec::with_capacity(HEADER_LEN);
        if !self.fill(&mut buf, HEADER_LEN).await? {
            return Ok(None);
        }
        let header = decode_header(&buf)?.context("frame header incomplete")?;
        let total = HEADER_LEN + header.body_len;
        let budget = self.budget.reserve(2 * total).await?;
        buf.reserve_exact(header.body_len);
        self.fill(&mut buf, total).await?;
        let (msg, used) = decode_frame(&buf)?.context("frame incomplete after its body")?;
        debug_assert_eq!(used, total);
        Ok(Some(Received {
            msg,
            raw: buf,
            budget,
        }))
    }
}
