//! ripcord's privileged integration tests live in `tests/`; run them with `cargo xtask test`.
