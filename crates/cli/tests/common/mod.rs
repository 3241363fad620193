//! The `ripcord` integration tests' helpers: the signed test store of
//! [`ripcord_restore::testing`], and ways to run the binary on it.
#![allow(dead_code, reason = "each test binary uses part of the fixture")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub use ripcord_restore::testing::*;

/// Runs `ripcord` on the fixture's store.
pub trait RunRipcord {
    fn ripcord(&self, args: &[&str]) -> Output;
    fn verify(&self) -> Output;
    /// `ripcord failover` of the latest point into `output`, with `extra` arguments.
    fn failover_into(&self, output: &Path, extra: &[&str]) -> Output;
    fn failover(&self, point: &str) -> (Output, PathBuf);
    /// Both `verify` and `failover` of `point` fail, and both name `object`.
    fn assert_refused(&self, point: &str, object: &str);
}

impl RunRipcord for Fixture {
    fn ripcord(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_ripcord"))
            .args(args)
            .env_remove("RIPCORD_PASSPHRASE")
            .output()
            .expect("running ripcord")
    }

    fn verify(&self) -> Output {
        let pass = self.tmp.path().join("pass");
        self.ripcord(&[
            "verify",
            "--target",
            &self.url(),
            "--passphrase-file",
            pass.to_str().expect("utf-8 path"),
        ])
    }

    fn failover_into(&self, output: &Path, extra: &[&str]) -> Output {
        let (pass, url, disk) = (self.pass(), self.url(), DISK.to_string());
        let mut args = vec![
            "failover",
            "--target",
            &url,
            "--disk",
            &disk,
            "--output",
            output.to_str().expect("utf-8 path"),
            "--passphrase-file",
            pass.to_str().expect("utf-8 path"),
        ];
        args.extend_from_slice(extra);
        self.ripcord(&args)
    }

    fn failover(&self, point: &str) -> (Output, PathBuf) {
        let pass = self.tmp.path().join("pass");
        let out = self.tmp.path().join(format!("{point}.img"));
        let o = self.ripcord(&[
            "failover",
            "--target",
            &self.url(),
            "--disk",
            &DISK.to_string(),
            "--point",
            point,
            "--output",
            out.to_str().expect("utf-8 path"),
            "--passphrase-file",
            pass.to_str().expect("utf-8 path"),
        ]);
        (o, out)
    }

    fn assert_refused(&self, point: &str, object: &str) {
        let v = self.verify();
        let text = output_text(&v);
        assert!(
            !v.status.success(),
            "verify accepted a tampered store:\n{text}"
        );
        assert!(
            text.contains(object),
            "verify does not name `{object}`:\n{text}"
        );
        let (f, img) = self.failover(point);
        let text = output_text(&f);
        assert!(
            !f.status.success(),
            "failover accepted a tampered store:\n{text}"
        );
        assert!(
            text.contains(object),
            "failover does not name `{object}`:\n{text}"
        );
        assert!(
            !img.exists(),
            "a refused failover left an image at {}",
            img.display()
        );
    }
}

pub fn output_text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
