//! The setup every privileged integration test starts with, in one place.
//!
//! - [`Lab`]: the root check and a scratch directory; loop devices are made in it. Tests
//!   that need no process server (capture) use it alone.
//! - [`Site`]: a `Lab` plus a running process server (`ripcord-ps`, optionally uploading to
//!   a target store) and one registered agent identity; it starts [`Replicator`]s for that
//!   identity. [`Site::new`] is the plain case, [`Site::builder`] the others (a `file://`
//!   target store, extra `ps.toml` lines, another machine name, a Garage S3 target).
//!
//! # Root and CI
//!
//! [`Lab::new`], [`Site::new`] and [`SiteBuilder::start`] return `None` when the test may
//! not run, after saying so loudly: the test then returns (it is skipped). They check
//! exactly what [`crate::require_root`] checks: not root is a skip, except under `CI=true`,
//! where it panics (a skipped privileged test is a failure there).
//!
//! # What is owned, and the drop order
//!
//! A `Site` owns, and drops in this order (its fields' declaration order):
//! 1. the process server (killed),
//! 2. the Garage server, if the target is S3 (killed; its log printed if the test panics),
//! 3. the scratch directory (removed, unless `RIPCORD_KEEP_SCRATCH` is set).
//!
//! Loop devices ([`Lab::loop_device`]) and agents ([`Site::replicator`]) are returned to
//! the test, which owns them together with its mounts. Being made from the fixture they are
//! declared after it, and locals drop in reverse order: a test that panics unmounts its
//! mounts, kills its agents and detaches its loop devices (in the reverse of the order it
//! made them, as before) and only then drops the site — the agents are gone before the
//! server is killed, and nothing is attached to or mounted in the scratch directory when it
//! is removed.
//!
//! Hence one rule: make nothing from a `Lab` that you then turn into a `Site`
//! ([`SiteBuilder::start_on`]) except what you hand to the site to own (the S3 test's
//! Garage): a loop device or mount made before would be dropped after the site, that is
//! after the scratch directory was removed.

use std::path::{Path, PathBuf};

use crate::{
    Garage, LoopDevice, Scratch,
    replication::{AgentIdentity, ProcessServer, Replicator},
    require_root,
};

/// A privileged test's scratch space: root checked, a scratch directory (named after the
/// test) removed on drop.
pub struct Lab {
    test: String,
    scratch: Scratch,
}

impl Lab {
    /// Check for root (see the module doc: `None` is a skip, `CI=true` panics) and create
    /// the scratch directory.
    pub fn new(test: &str) -> Option<Lab> {
        if !require_root(test) {
            return None;
        }
        Some(Lab {
            test: test.to_owned(),
            scratch: Scratch::new(test),
        })
    }

    /// The scratch directory.
    pub fn path(&self) -> &Path {
        &self.scratch.path
    }

    /// The test's name.
    pub fn test(&self) -> &str {
        &self.test
    }

    /// A loop device of `size` bytes over a new sparse file `file` in the scratch
    /// directory. Keep it in a local declared after the fixture (see the module doc).
    pub fn loop_device(&self, file: &str, size: u64) -> LoopDevice {
        let backing = self.path().join(file);
        LoopDevice::create(&backing, size)
            .unwrap_or_else(|e| panic!("{}: loop device over {file}: {e:#}", self.test))
    }

    /// A new directory `name` in the scratch directory (e.g. one per run of a repeated
    /// scenario).
    pub fn subdir(&self, name: &str) -> PathBuf {
        let dir = self.path().join(name);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        dir
    }
}

/// A [`Lab`] with a running process server and a registered agent identity.
///
/// Fields drop in declaration order: the server, then Garage, then the scratch directory.
pub struct Site {
    /// The process server; its deployment is `<scratch>/ps`, its passphrase file
    /// `<scratch>/passphrase`.
    pub ps: ProcessServer,
    /// The agent identity registered with `ps` (state in `<scratch>/agent-<machine>`).
    pub id: AgentIdentity,
    target: Option<String>,
    garage: Option<Garage>,
    lab: Lab,
}

/// How to start a [`Site`]: see [`Site::builder`].
pub struct SiteBuilder {
    test: String,
    target: Option<Target>,
    ps_config: String,
    machine: String,
}

enum Target {
    File,
    Url(String),
    Garage(Garage),
}

/// The directory of a [`SiteBuilder::file_target`] store, under the scratch directory.
pub const FILE_TARGET_DIR: &str = "target-store";

impl Site {
    /// [`Lab::new`], then a process server without a target store (journal only) and an
    /// agent identity registered as machine `host`. `None`: skip (see the module doc).
    pub fn new(test: &str) -> Option<Site> {
        Site::builder(test).start()
    }

    /// A site with options; finish with [`SiteBuilder::start`] (or
    /// [`SiteBuilder::start_on`] for a `Lab` already made).
    pub fn builder(test: &str) -> SiteBuilder {
        SiteBuilder {
            test: test.to_owned(),
            target: None,
            ps_config: String::new(),
            machine: "host".to_owned(),
        }
    }

    /// The scratch directory.
    pub fn path(&self) -> &Path {
        self.lab.path()
    }

    /// The test's name.
    pub fn test(&self) -> &str {
        self.lab.test()
    }

    /// See [`Lab::loop_device`].
    pub fn loop_device(&self, file: &str, size: u64) -> LoopDevice {
        self.lab.loop_device(file, size)
    }

    /// See [`Lab::subdir`].
    pub fn subdir(&self, name: &str) -> PathBuf {
        self.lab.subdir(name)
    }

    /// The target store URL the process server uploads to. Panics if it has none.
    pub fn target(&self) -> &str {
        self.target
            .as_deref()
            .unwrap_or_else(|| panic!("{}: this site has no target store", self.test()))
    }

    /// The Garage server of an S3 site ([`SiteBuilder::s3`]). Panics if there is none.
    pub fn garage(&self) -> &Garage {
        self.garage
            .as_ref()
            .unwrap_or_else(|| panic!("{}: this site has no Garage", self.test()))
    }

    /// Register another agent identity with the process server.
    pub fn register(&self, machine: &str) -> AgentIdentity {
        AgentIdentity::register(&self.ps, self.path(), machine)
            .unwrap_or_else(|e| panic!("{}: registering {machine}: {e:#}", self.test()))
    }

    /// Start the site's agent protecting `devices` (no config file); returns once it
    /// tracks. Keep it in a local declared after the site (see the module doc).
    pub fn replicator(&self, devices: &[&Path]) -> Replicator {
        self.replicator_with(devices, &[], &[])
    }

    /// Like [`Site::replicator`], with extra `ripcord-agent protect` arguments (e.g.
    /// `--config <file>`) and environment variables (fault injection).
    pub fn replicator_with(
        &self,
        devices: &[&Path],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Replicator {
        Replicator::start_with_env(&self.id, devices, extra, env)
            .unwrap_or_else(|e| panic!("{}: starting the agent: {e:#}", self.test()))
    }

    /// Stops `agent` cleanly (SIGTERM: it waits until everything it sent is durable) and
    /// waits until the target store holds a point of `disk` with every batch the agent
    /// pushed: the disk's final state. Returns the agent's log and that point (the JSON of
    /// `ripcord points list`). Panics, with the logs, if the agent does not stop cleanly or
    /// no such point comes within 90 s.
    pub fn final_point(&self, agent: Replicator, disk: &str) -> (String, serde_json::Value) {
        let (log, mut points) = self.final_points(agent, &[disk]);
        (log, points.remove(0))
    }

    /// Like [`Site::final_point`], for each of `disks` (ids) the agent protects.
    pub fn final_points(
        &self,
        agent: Replicator,
        disks: &[&str],
    ) -> (String, Vec<serde_json::Value>) {
        let stats = agent.stats_file.clone();
        let (ok, log) = agent
            .stop()
            .unwrap_or_else(|e| panic!("{}: stopping the agent: {e:#}", self.test()));
        assert!(
            ok,
            "{}: the agent did not stop cleanly:\n{log}",
            self.test()
        );
        let points = disks
            .iter()
            .map(|disk| {
                crate::replication::wait_for_point(
                    self.target(),
                    disk,
                    &self.ps.passphrase_file,
                    Replicator::pushed_seq_of(&stats, Some(disk)),
                    std::time::Duration::from_secs(90),
                )
                .unwrap_or_else(|e| {
                    panic!(
                        "{}: disk {disk}: {e:#}\nagent log:\n{log}\nprocess server log:\n{}",
                        self.test(),
                        self.ps.logs()
                    )
                })
            })
            .collect();
        (log, points)
    }

    /// Like [`Site::replicator_with`], replicating to `server` (e.g. a
    /// [`crate::FaultProxy`] in front of [`ProcessServer::data_addr`]) instead of the data
    /// endpoint saved at registration. The TLS server name stays the registered one
    /// (state.json `server_name`, `127.0.0.1`), so the server's certificate still matches.
    pub fn replicator_via(
        &self,
        server: std::net::SocketAddr,
        devices: &[&Path],
        extra: &[&str],
    ) -> Replicator {
        let args = via_args(server, extra);
        self.replicator_with(devices, &strs(&args), &[])
    }

    /// Like [`Site::replicator_via`], the agent running inside `netns`.
    pub fn replicator_in(
        &self,
        netns: &crate::Netns,
        server: std::net::SocketAddr,
        devices: &[&Path],
        extra: &[&str],
    ) -> Replicator {
        let args = via_args(server, extra);
        Replicator::start_in(Some(netns), &self.id, devices, &strs(&args), &[]).unwrap_or_else(
            |e| {
                panic!(
                    "{}: starting the agent in {}: {e:#}",
                    self.test(),
                    netns.name
                )
            },
        )
    }
}

/// `ripcord-agent protect` arguments to replicate to `server`, then `extra`.
fn via_args(server: std::net::SocketAddr, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["--server".to_owned(), server.to_string()];
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    args
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

impl SiteBuilder {
    /// Upload to a `file://` target store in `<scratch>/target-store` ([`FILE_TARGET_DIR`]).
    pub fn file_target(mut self) -> Self {
        self.target = Some(Target::File);
        self
    }

    /// Upload to the target store at `url`.
    pub fn target(mut self, url: &str) -> Self {
        self.target = Some(Target::Url(url.to_owned()));
        self
    }

    /// Upload to `garage`'s bucket, and own the server: it is killed after the process
    /// server and before the scratch directory is removed. `garage` must run in the
    /// `Lab` passed to [`SiteBuilder::start_on`], with its environment exported
    /// ([`Garage::export_env`]) so that the process server and the CLI reach it.
    pub fn s3(mut self, garage: Garage) -> Self {
        self.target = Some(Target::Garage(garage));
        self
    }

    /// Extra `ps.toml` lines.
    pub fn ps_config(mut self, extra: &str) -> Self {
        self.ps_config = extra.to_owned();
        self
    }

    /// Register the agent identity as `machine` (default `host`).
    pub fn machine(mut self, machine: &str) -> Self {
        self.machine = machine.to_owned();
        self
    }

    /// [`Lab::new`] (`None`: skip, see the module doc), then [`SiteBuilder::start_on`].
    pub fn start(self) -> Option<Site> {
        let lab = Lab::new(&self.test)?;
        Some(self.start_on(lab))
    }

    /// Start the process server in `lab` and register the agent identity. Panics on
    /// failure.
    pub fn start_on(self, lab: Lab) -> Site {
        let (target, garage) = match self.target {
            None => (None, None),
            Some(Target::File) => (
                Some(format!(
                    "file://{}",
                    lab.path().join(FILE_TARGET_DIR).display()
                )),
                None,
            ),
            Some(Target::Url(url)) => (Some(url), None),
            Some(Target::Garage(g)) => (Some(g.url()), Some(g)),
        };
        let ps = ProcessServer::start_with_config(lab.path(), target.as_deref(), &self.ps_config)
            .unwrap_or_else(|e| panic!("{}: starting the process server: {e:#}", self.test));
        let id = AgentIdentity::register(&ps, lab.path(), &self.machine)
            .unwrap_or_else(|e| panic!("{}: registering {}: {e:#}", self.test, self.machine));
        Site {
            ps,
            id,
            target,
            garage,
            lab,
        }
    }
}
