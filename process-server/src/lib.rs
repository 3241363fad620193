//! ripcord's process server: receives replication streams from agents over mutual-TLS
//! QUIC, journals them durably on the cache disk, and acknowledges only what is durable.

pub mod config;
pub mod config_metrics;
pub mod control;
pub mod db_watch;
pub mod deploy;
pub mod disk;
pub mod frames;
pub mod groups;
pub mod health;
pub mod ingest;
pub mod join;
pub mod metrics;
pub mod peers;
pub mod placement;
pub mod policies;
pub mod registry;
pub mod replay;
pub mod reporting;
pub mod server;
mod session;
pub mod status_page;
pub mod uploader;
