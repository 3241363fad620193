//! ripcord transport: deployment PKI, agent registration and mutual-TLS QUIC endpoints.
//!
//! - [`pki`]: the deployment CA, server/client certificates, bootstrap tokens.
//! - [`register`](mod@register): kubeadm-join style agent registration (ALPN `ripcord-register/2`).
//! - [`endpoint`]: mutual-TLS data-path endpoints (ALPN `ripcord/1`).
//! - [`control`]: process servers joining and reporting to the configuration role
//!   (ALPN `ripcord-control/1`).
//!
//! Only the *ring* crypto provider is used (no aws-lc-rs).
#![deny(missing_docs)]

pub mod control;
pub mod endpoint;
mod fsutil;
pub mod pki;
pub mod register;

pub use endpoint::{
    CLOSE_CERTIFICATE_REFUSED, DATA_ALPN, EndpointError, TransportOptions, client_endpoint,
    connect, peer_certificate, peer_machine_id, server_endpoint,
};
pub use pki::{
    Ca, Identity, MachineError, MachineId, MachineStore, PkiError, ServerIdentity, Token,
    TokenError, TokenStore, ca_hash,
};
pub use register::{
    Credentials, Placed, Placement, REGISTER_ALPN, RegisterError, Registered, Registrar,
    Registration, ServeError, register, registration_endpoint, serve_registration,
};
