//! Recovery plans (issue 16): a TOML file naming ordered groups of machines, what to run
//! before and after each group, where each machine's disks are written, and how to start
//! it and know it is up. `ripcord plan check` validates a plan; [`run`] executes one.
//!
//! ```toml
//! name = "erp"
//! target = "file:///var/lib/ripcord/ps/target"
//!
//! [[group]]
//! name = "database"
//! pre = [{ run = "/usr/local/bin/notify 'failing over the database'", timeout-secs = 30 }]
//! post = [{ manual = "Check that the database accepts connections" }]
//!
//! [[group.machine]]
//! name = "db1"
//! disks = [{ disk = "3c3c…", output = "/var/lib/recovery/db1-root.img" }]
//! start = "qemu-system-x86_64 -m 2048 -drive file=$RIPCORD_DISK_0,format=raw -daemonize"
//! ready = { tcp = "10.0.0.5:5432", timeout-secs = 300 }
//! ```
//!
//! # Invariants checked by [`Plan::load`]
//! - The file is not writable by anyone but its owner, and its owner is root or the user
//!   running `ripcord`: it runs commands as that user.
//! - Names (plan, groups, machines) are 1..=64 printable characters without `/`; group
//!   and machine names are unique; every machine has 1..=64 disks; a disk appears once in
//!   a plan; outputs are absolute and distinct.
//! - An action is exactly one of `run` (a shell command, with `timeout-secs`, 1..=86400,
//!   default 300) or `manual` (a message: the plan pauses until `ripcord plan resume`).
//! - A readiness check is exactly one of `tcp` (`HOST:PORT`) or `command`, with
//!   `timeout-secs`; a machine with `ready` and no `start` is accepted (something else
//!   starts it).

mod process;
pub mod run;
pub mod state;

use std::{
    collections::BTreeSet,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail, ensure};
use ripcord_store::DiskId;
use serde::{Deserialize, Serialize};

/// Largest plan file read.
const MAX_PLAN_BYTES: u64 = 1 << 20;
/// Longest a script or readiness check may be given.
const MAX_TIMEOUT_SECS: u64 = 86_400;

/// A recovery plan.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Plan {
    pub name: String,
    /// The target store the disks are recovered from.
    pub target: String,
    #[serde(rename = "group")]
    pub groups: Vec<Group>,
    /// SHA-256 (hex) of the file it was loaded from: a run records it, and going on with
    /// a run after the file changed is refused.
    #[serde(skip)]
    pub sha256: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Group {
    pub name: String,
    /// Run before the group's machines are failed over, in order.
    #[serde(default)]
    pub pre: Vec<Action>,
    /// Run after every machine of the group is up, in order.
    #[serde(default)]
    pub post: Vec<Action>,
    #[serde(rename = "machine")]
    pub machines: Vec<Machine>,
}

/// A script, or a manual step the plan pauses for.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Action {
    #[serde(default)]
    pub run: Option<String>,
    #[serde(default)]
    pub manual: Option<String>,
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Machine {
    pub name: String,
    pub disks: Vec<DiskOutput>,
    /// Shell command that starts the machine from its disks (`$RIPCORD_DISK_0`, ...).
    #[serde(default)]
    pub start: Option<String>,
    /// What must pass before the next group starts.
    #[serde(default)]
    pub ready: Option<Ready>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DiskOutput {
    /// Disk id (32 hex digits).
    pub disk: String,
    /// Image file or block device the disk is written to (by a real failover; a test
    /// failover writes into its scratch directory instead).
    pub output: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Ready {
    /// `HOST:PORT` that must accept a TCP connection.
    #[serde(default)]
    pub tcp: Option<String>,
    /// Shell command that must exit 0 (tried every second).
    #[serde(default)]
    pub command: Option<String>,
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

fn default_timeout() -> u64 {
    300
}

impl Plan {
    /// Reads and validates `path` (see the module doc for what is checked).
    pub fn load(path: &Path) -> anyhow::Result<Plan> {
        let md = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
        ensure!(
            md.mode() & 0o022 == 0,
            "{} is writable by others (mode {:o}): a plan runs commands, so only its owner may \
             change it (chmod go-w)",
            path.display(),
            md.mode() & 0o777
        );
        let me = nix::unistd::geteuid().as_raw();
        ensure!(
            md.uid() == 0 || md.uid() == me,
            "{} belongs to uid {}, neither root nor you: a plan runs commands as you",
            path.display(),
            md.uid()
        );
        ensure!(
            md.len() <= MAX_PLAN_BYTES,
            "{} is over 1 MiB: not a plan",
            path.display()
        );
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut plan: Plan =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        plan.sha256 = hex::encode(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()));
        plan.validate()
            .with_context(|| format!("{} is not a valid plan", path.display()))?;
        Ok(plan)
    }

    /// The checks of the module doc.
    pub fn validate(&self) -> anyhow::Result<()> {
        check_name("the plan", &self.name)?;
        ensure!(!self.target.is_empty(), "`target` is empty");
        ensure!(!self.groups.is_empty(), "the plan has no [[group]]");
        let (mut groups, mut machines) = (BTreeSet::new(), BTreeSet::new());
        let (mut disks, mut outputs) = (BTreeSet::new(), BTreeSet::new());
        for g in &self.groups {
            check_name("a group", &g.name)?;
            ensure!(groups.insert(&g.name), "two groups are named {:?}", g.name);
            ensure!(
                !g.machines.is_empty(),
                "group {:?} has no [[group.machine]]",
                g.name
            );
            for (i, a) in g.pre.iter().chain(&g.post).enumerate() {
                a.validate()
                    .with_context(|| format!("group {:?}, action {}", g.name, i + 1))?;
            }
            for m in &g.machines {
                check_name("a machine", &m.name)?;
                ensure!(
                    machines.insert(&m.name),
                    "two machines are named {:?}",
                    m.name
                );
                let what = |s: &str| format!("machine {:?}: {s}", m.name);
                ensure!(
                    (1..=64).contains(&m.disks.len()),
                    "{}",
                    what("needs 1..=64 disks")
                );
                for d in &m.disks {
                    let id: DiskId = crate::failover::parse_disk(&d.disk)
                        .with_context(|| what("a disk id is not 32 hex digits"))?;
                    ensure!(
                        disks.insert(id),
                        "{}",
                        what(&format!("disk {id} is in the plan twice"))
                    );
                    ensure!(
                        d.output.is_absolute(),
                        "{}",
                        what(&format!("output {} is not absolute", d.output.display()))
                    );
                    ensure!(
                        outputs.insert(&d.output),
                        "{}",
                        what(&format!("output {} is used twice", d.output.display()))
                    );
                }
                if let Some(s) = &m.start {
                    ensure!(!s.trim().is_empty(), "{}", what("`start` is empty"));
                }
                if let Some(r) = &m.ready {
                    r.validate().with_context(|| what("`ready`"))?;
                }
            }
        }
        Ok(())
    }

    /// Every disk of the plan, with its machine.
    pub fn disks(&self) -> impl Iterator<Item = (&Machine, &DiskOutput)> {
        self.groups
            .iter()
            .flat_map(|g| &g.machines)
            .flat_map(|m| m.disks.iter().map(move |d| (m, d)))
    }
}

impl Action {
    fn validate(&self) -> anyhow::Result<()> {
        match (&self.run, &self.manual) {
            (Some(r), None) => ensure!(!r.trim().is_empty(), "`run` is empty"),
            (None, Some(m)) => ensure!(!m.trim().is_empty(), "`manual` is empty"),
            _ => bail!("give exactly one of `run` (a command) or `manual` (a message)"),
        }
        check_timeout(self.timeout_secs)
    }
}

impl Ready {
    fn validate(&self) -> anyhow::Result<()> {
        match (&self.tcp, &self.command) {
            (Some(addr), None) => ensure!(
                addr.rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()),
                "tcp {addr:?} is not HOST:PORT"
            ),
            (None, Some(c)) => ensure!(!c.trim().is_empty(), "`command` is empty"),
            _ => bail!("give exactly one of `tcp` (HOST:PORT) or `command`"),
        }
        check_timeout(self.timeout_secs)
    }
}

fn check_timeout(secs: u64) -> anyhow::Result<()> {
    ensure!(
        (1..=MAX_TIMEOUT_SECS).contains(&secs),
        "timeout-secs {secs} is not 1..={MAX_TIMEOUT_SECS}"
    );
    Ok(())
}

fn check_name(what: &str, name: &str) -> anyhow::Result<()> {
    ensure!(
        !name.is_empty()
            && name.len() <= 64
            && !name.contains('/')
            && name.chars().all(|c| !c.is_control()),
        "{what} is named {name:?}: names are 1..=64 printable characters without `/`"
    );
    Ok(())
}

/// `ripcord plan check`: the plan is valid and, unless `offline`, every disk of it has a
/// recovery point in the target store.
pub async fn check(path: &Path, offline: bool) -> anyhow::Result<()> {
    let plan = Plan::load(path)?;
    let machines: usize = plan.groups.iter().map(|g| g.machines.len()).sum();
    let disks = plan.disks().count();
    if !offline {
        let store = crate::open_store(&plan.target).await?;
        for (m, d) in plan.disks() {
            let id = crate::known_disk(&store, &plan.target, &d.disk)
                .await
                .with_context(|| format!("machine {:?}", m.name))?;
            ensure!(
                store.latest_point(&id).await?.is_some(),
                "machine {:?}: disk {id} has no recovery point yet",
                m.name
            );
        }
    }
    println!(
        "plan {:?} is valid: {} groups, {machines} machines, {disks} disks{}",
        plan.name,
        plan.groups.len(),
        if offline {
            " (the target store was not checked)"
        } else {
            "; every disk has a recovery point"
        }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        name = "erp"
        target = "file:///t"
        [[group]]
        name = "db"
        pre = [{ run = "true" }, { manual = "look" }]
        [[group.machine]]
        name = "db1"
        disks = [{ disk = "3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c", output = "/r/db1.img" }]
        ready = { tcp = "127.0.0.1:5432" }
    "#;

    fn parse(text: &str) -> anyhow::Result<Plan> {
        let p: Plan = toml::from_str(text)?;
        p.validate()?;
        Ok(p)
    }

    #[test]
    fn the_documented_example_is_a_valid_plan() {
        let p = parse(include_str!("../../../../docs/examples/recovery-plan.toml")).unwrap();
        assert_eq!(p.groups.len(), 3);
        assert_eq!(p.disks().count(), 4);
    }

    #[test]
    fn a_good_plan_validates_and_mistakes_are_named() {
        let p = parse(GOOD).unwrap();
        assert_eq!(p.groups[0].pre[0].timeout_secs, 300);
        for (edit, named) in [
            (GOOD.replace("/r/db1.img", "r/db1.img"), "not absolute"),
            (
                GOOD.replace("3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c", "xyz"),
                "32 hex digits",
            ),
            (
                GOOD.replace("{ manual = \"look\" }", "{ run = \"a\", manual = \"b\" }"),
                "exactly one",
            ),
            (GOOD.replace("127.0.0.1:5432", "localhost"), "HOST:PORT"),
            (
                GOOD.replace("name = \"db1\"", "name = \"a/b\""),
                "without `/`",
            ),
            (
                GOOD.replace("{ run = \"true\" }", "{ run = \"true\", timeout-secs = 0 }"),
                "timeout-secs 0",
            ),
            (GOOD.replace("ready =", "reddy ="), "unknown field"),
        ] {
            let e = format!("{:#}", parse(&edit).unwrap_err());
            assert!(e.contains(named), "{named:?} not in {e:?}");
        }
        let twice = format!(
            "{GOOD}\n[[group]]\nname = \"app\"\n[[group.machine]]\nname = \"app1\"\n\
             disks = [{{ disk = \"3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c\", output = \"/r/x.img\" }}]\n"
        );
        let e = format!("{:#}", parse(&twice).unwrap_err());
        assert!(e.contains("in the plan twice"), "{e}");
    }
}
