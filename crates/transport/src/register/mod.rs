//! Agent registration (kubeadm-join style) over QUIC, ALPN `ripcord-register/3` (and
//! `/2`, whose replies do not name a placement).
//!
//! The agent pins the deployment CA by its hash ([`crate::pki::ca_hash`]); the server
//! authenticates the agent with a bootstrap [`Token`](crate::pki::Token). The agent's
//! private key is generated locally and never leaves it: only a CSR is sent.
//!
//! One bidirectional stream opened by the agent carries one request and one reply; the
//! message encoding and its size bounds are in `codec.rs` (see [`MAX_MESSAGE_SIZE`],
//! [`RejectReason`], [`FrameError`]). The agent side ([`register`],
//! [`connect_registration`], [`RegisterError`]) is in `client.rs`; the process-server
//! side ([`registration_endpoint`], [`serve_registration`], [`ServeError`],
//! [`Registration`]) in `server.rs`.
//!
//! # Wire format
//! One bidirectional stream opened by the agent; each direction carries exactly one frame:
//! `u32 BE body length (≤ MAX_MESSAGE_SIZE)` followed by the body. Bodies are a type byte
//! followed by fields, each `u32 BE length` + bytes:
//! - request `0x01`: token (`id.secret`), machine id, CSR (DER);
//! - success `0x02`: client certificate (DER), CA certificate (DER);
//! - refusal `0x03`: one byte [`RejectReason`] code (no fields).

use std::time::Duration;

use crate::endpoint::{EndpointError, TransportOptions};

mod client;
mod codec;
mod server;

pub(crate) use client::connect_pinned;
pub use client::{Credentials, RegisterError, Registered, connect_registration, register};
#[doc(hidden)]
pub use codec::fuzzing;
pub use codec::{FrameError, MAX_MESSAGE_SIZE, RejectReason};
pub(crate) use codec::{read_frame_bounded, write_frame_bounded};
pub use server::{
    Placed, Placement, Registrar, Registration, ServeError, negotiated_alpn, registration_endpoint,
    serve_registration, serve_registration_connection,
};

/// ALPN protocol id of the registration endpoint.
/// Version 3: replies also name the process server the machine is placed on.
pub const REGISTER_ALPN: &[u8] = b"ripcord-register/3";
/// Version 2 (still served): requests may be renewals (no token, the current certificate
/// as the TLS client certificate) and replies carry the escrow key and the data port.
pub const REGISTER_ALPN_V2: &[u8] = b"ripcord-register/2";
/// Overall time limit for one registration exchange (handshake included).
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);
/// A registration handshake that hears nothing for this long fails
/// ([`RegisterError::NoAnswer`] when not a single packet of the server's came back).
pub const REGISTER_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// QUIC transport settings of a registration connection, on both sides: flow-control
/// windows of a few [`MAX_MESSAGE_SIZE`], the one bidirectional stream and no
/// unidirectional ones, no keep-alive, a 10 s idle timeout.
fn registration_transport() -> Result<quinn::TransportConfig, EndpointError> {
    TransportOptions {
        stream_receive_window: 2 * MAX_MESSAGE_SIZE as u64,
        receive_window: 4 * MAX_MESSAGE_SIZE as u64,
        send_window: 4 * MAX_MESSAGE_SIZE as u64,
        keep_alive_interval: None,
        idle_timeout: REGISTER_IDLE_TIMEOUT,
        max_concurrent_bidi_streams: 1,
        max_concurrent_uni_streams: 0,
        congestion: crate::endpoint::Congestion::Cubic,
    }
    .to_transport_config()
}
