//! Running a plan: `ripcord plan failover | test-failover | resume | cleanup`.
//!
//! # Steps
//! A plan runs as a fixed list of steps: for each group in order, its `pre` actions, the
//! failover of its machines (every disk of every machine of the group at once), the start
//! of its machines with their readiness checks (all machines at once), then its `post`
//! actions. A group's machines are up (ready) before the next group begins.
//!
//! # The run's state, and its report
//! `<state-dir>/<plan>.json` (replaced durably after every step) records the steps done,
//! the recovery point chosen for every disk when the run began (a resumed run uses the
//! same points, so the machines stay consistent with each other), the outputs, the
//! processes the run started, and how it stopped:
//! - a `manual` action **pauses** it: `ripcord plan resume` goes on with the next step;
//! - a failing step **stops** it with a report: `--continue` runs that step again, then the
//!   rest;
//! - a **finished** run stays as the record; the next run starts anew;
//! - a run whose process died (killed, host rebooted) is found `running` with nobody
//!   holding its lock: it counts as failed at the step it was in, and `--continue` takes
//!   it over from there.
//!
//! # One run at a time
//! Every command on a plan holds `<state-dir>/<plan>.lock` (flock) while it runs: a second
//! `ripcord plan` on the same plan is refused at once, naming the lock, instead of writing
//! the same disks twice or reading a state that changes under it.
//!
//! Each state is also written to `<state-dir>/reports/<plan>-<run id>.json`: steps, times,
//! exit codes and the points used, for audits. A test failover writes its disks into the
//! scratch directory (never the plan's outputs) and never touches replication;
//! `ripcord plan cleanup` stops what it started and removes its images.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use ripcord_store::{CutKind, DiskId};

use super::{
    Action, Group, Machine, Plan,
    process::{ScriptFailed, kill_group, run_script, spawn_start, wait_ready},
    state::{
        ChosenPoint, Mode, RunState, Started, Status, StepRecord, load_state, save_state,
        state_path,
    },
};
use crate::{Format, failover::PointSpec, run_failover::write_point};

/// How `execute` begins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Begin {
    /// A new run (refused while one is paused or failed).
    New,
    /// After a failure: the failed step again, then the rest.
    Continue,
    /// After a manual pause: the next step.
    Resume,
}

pub struct RunOptions {
    pub mode: Mode,
    pub point: String,
    pub begin: Begin,
    pub state_dir: PathBuf,
    pub scratch: PathBuf,
    pub passphrase_file: Option<PathBuf>,
    /// Overwrite outputs the output guard refuses (real failover only).
    pub force: bool,
}

/// One step of a plan.
enum Step<'a> {
    Action {
        group: &'a Group,
        action: &'a Action,
    },
    Failover(&'a Group),
    Start(&'a Group),
}

fn steps(plan: &Plan) -> Vec<(String, Step<'_>)> {
    let mut out = Vec::new();
    for g in &plan.groups {
        for (i, a) in g.pre.iter().enumerate() {
            out.push((
                format!("{}: pre {}", g.name, i + 1),
                Step::Action {
                    group: g,
                    action: a,
                },
            ));
        }
        out.push((format!("{}: failover", g.name), Step::Failover(g)));
        out.push((format!("{}: start", g.name), Step::Start(g)));
        for (i, a) in g.post.iter().enumerate() {
            out.push((
                format!("{}: post {}", g.name, i + 1),
                Step::Action {
                    group: g,
                    action: a,
                },
            ));
        }
    }
    out
}

fn now_text() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Runs (or goes on with) a plan; see the module doc.
pub async fn execute(plan_path: &Path, o: RunOptions) -> anyhow::Result<()> {
    let plan = Plan::load(plan_path)?;
    std::fs::create_dir_all(&o.state_dir)
        .with_context(|| format!("creating {}", o.state_dir.display()))?;
    let _lock = lock_plan(&o.state_dir, &plan.name)?;
    let steps = steps(&plan);
    let store = crate::open_store(&plan.target).await?;
    // A run left `running` while we hold its lock: its process died mid-step.
    let previous = load_state(&o.state_dir, &plan.name)?.map(|mut s| {
        if s.status == Status::Running {
            s.status = Status::Failed;
            s.message = Some(format!(
                "interrupted: the process running it died during step {}",
                steps
                    .get(s.next)
                    .map_or_else(|| (s.next + 1).to_string(), |(name, _)| format!("{name:?}"))
            ));
        }
        s
    });
    let hint = |s: &RunState| match s.status {
        Status::Paused => "`ripcord plan resume` goes on after it".to_owned(),
        Status::Failed => format!(
            "`ripcord plan {} --continue` runs the failed step again",
            s.mode.as_str()
        ),
        _ => "it is still running".to_owned(),
    };
    let mut state = match (o.begin, previous) {
        (Begin::New, Some(s)) if s.status != Status::Done => bail!(
            "plan {:?} has a {} run {:?} ({}): {}; or `ripcord plan cleanup` after a test \
             failover, or remove {} to abandon it",
            plan.name,
            s.mode.as_str(),
            s.status,
            s.message.as_deref().unwrap_or(""),
            hint(&s),
            state_path(&o.state_dir, &plan.name).display()
        ),
        (Begin::New, _) => new_run(&plan, &store, &o).await?,
        (Begin::Continue, Some(s)) if s.status == Status::Failed && s.mode == o.mode => s,
        (Begin::Resume, Some(s)) if s.status == Status::Paused => s,
        (begin, s) => bail!(
            "nothing to {} for plan {:?}: {}",
            if begin == Begin::Resume {
                "resume (no paused run)"
            } else {
                "continue (no failed run of this kind)"
            },
            plan.name,
            s.map_or("it has no run".to_owned(), |s| format!(
                "its last run is a {} that is {:?}",
                s.mode.as_str(),
                s.status
            ))
        ),
    };
    if let Some(then) = state.plan_sha256.as_deref()
        && then != plan.sha256
    {
        bail!(
            "{} changed since run {} began (sha256 {then} then, {} now): the steps it recorded \
             may no longer be the plan's. Put the file back as it was to go on, or abandon the \
             run (`ripcord plan cleanup` after a test failover, or remove {})",
            plan_path.display(),
            state.run_id,
            plan.sha256,
            state_path(&o.state_dir, &plan.name).display()
        );
    }
    ensure!(
        state.next <= steps.len(),
        "the state of plan {:?} is past its last step: was the plan changed?",
        plan.name
    );
    // Asked once, and only if a failover is still to come.
    let pass = if steps[state.next..]
        .iter()
        .any(|(_, s)| matches!(s, Step::Failover(_)))
    {
        Some(ripcord_seal::read_passphrase(o.passphrase_file.as_deref())?)
    } else {
        None
    };
    let pass: &[u8] = pass.as_deref().map_or(&[], |p| p.as_slice());
    state.status = Status::Running;
    state.message = None;
    save_state(&o.state_dir, &state)?;
    println!(
        "plan {:?}: {} run {}, from step {} of {}",
        plan.name,
        state.mode.as_str(),
        state.run_id,
        state.next + 1,
        steps.len()
    );
    while state.next < steps.len() {
        let (name, step) = &steps[state.next];
        let begun = Instant::now();
        let started = now_text();
        println!("[{}/{}] {name}", state.next + 1, steps.len());
        let env = [
            ("RIPCORD_PLAN".to_owned(), plan.name.clone()),
            ("RIPCORD_MODE".to_owned(), state.mode.as_str().to_owned()),
            ("RIPCORD_STEP".to_owned(), name.clone()),
        ];
        let result: anyhow::Result<(Option<i32>, String)> = match step {
            Step::Action { group, action } => match (&action.run, &action.manual) {
                (_, Some(message)) => {
                    state.steps.push(StepRecord {
                        step: name.clone(),
                        status: Status::Paused,
                        started,
                        secs: 0.0,
                        exit_code: None,
                        detail: message.clone(),
                    });
                    state.next += 1;
                    state.status = Status::Paused;
                    state.message = Some(format!("{name}: {message}"));
                    save_state(&o.state_dir, &state)?;
                    println!(
                        "paused for a manual step: {message}\nWhen it is done: ripcord plan \
                         resume --plan {}",
                        plan_path.display()
                    );
                    return Ok(());
                }
                (Some(cmd), None) => {
                    let mut env = env.to_vec();
                    env.push(("RIPCORD_GROUP".to_owned(), group.name.clone()));
                    let (cmd, timeout) = (cmd.clone(), action.timeout_secs);
                    tokio::task::spawn_blocking(move || run_script(&cmd, timeout, &env))
                        .await?
                        .map(|code| (Some(code), format!("exit status {code}")))
                }
                (None, None) => unreachable!("validated: an action is a command or a message"),
            },
            Step::Failover(group) => failover_group(&store, group, &state, &o, pass)
                .await
                .map(|d| (None, d)),
            Step::Start(group) => start_group(group, &mut state, &o.state_dir, &env)
                .await
                .map(|d| (None, d)),
        };
        let secs = begun.elapsed().as_secs_f64();
        match result {
            Ok((exit_code, detail)) => {
                state.steps.push(StepRecord {
                    step: name.clone(),
                    status: Status::Done,
                    started,
                    secs,
                    exit_code,
                    detail,
                });
                state.next += 1;
                save_state(&o.state_dir, &state)?;
            }
            Err(e) => {
                let detail = crate::error_text(&e);
                state.steps.push(StepRecord {
                    step: name.clone(),
                    status: Status::Failed,
                    started,
                    secs,
                    exit_code: e.downcast_ref::<ScriptFailed>().and_then(|f| f.code),
                    detail: detail.clone(),
                });
                state.status = Status::Failed;
                state.message = Some(format!("{name}: {detail}"));
                save_state(&o.state_dir, &state)?;
                bail!(
                    "plan {:?} stopped at step {} ({name}): {detail}\nreport: {}\nfix the \
                     cause, then: ripcord plan {} --plan {} --continue",
                    plan.name,
                    state.next + 1,
                    o.state_dir
                        .join("reports")
                        .join(format!("{}-{}.json", plan.name, state.run_id))
                        .display(),
                    state.mode.as_str(),
                    plan_path.display()
                );
            }
        }
    }
    state.status = Status::Done;
    save_state(&o.state_dir, &state)?;
    println!(
        "plan {:?} done: {} steps; report {}",
        plan.name,
        steps.len(),
        o.state_dir
            .join("reports")
            .join(format!("{}-{}.json", plan.name, state.run_id))
            .display()
    );
    Ok(())
}

/// A new run: the point of every disk is chosen now, once.
async fn new_run(
    plan: &Plan,
    store: &ripcord_store::Store,
    o: &RunOptions,
) -> anyhow::Result<RunState> {
    let spec: PointSpec = o.point.parse()?;
    let run_id = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace(':', "");
    // The group points are read once, so every disk of a group gets the same instant.
    let group_points = match spec {
        PointSpec::LatestGroup | PointSpec::LatestGroupApp => Some(
            crate::group_points::latest_group_points(store, spec == PointSpec::LatestGroupApp)
                .await?,
        ),
        _ => None,
    };
    let mut points = BTreeMap::new();
    for (m, d) in plan.disks() {
        let disk = crate::known_disk(store, &plan.target, &d.disk)
            .await
            .with_context(|| format!("machine {:?}", m.name))?;
        let spec = match &group_points {
            Some(chosen) => PointSpec::Id(
                chosen
                    .get(&disk)
                    .with_context(|| {
                        format!(
                            "machine {:?}: disk {disk} is in no complete group point",
                            m.name
                        )
                    })?
                    .clone(),
            ),
            None => spec.clone(),
        };
        let p = crate::failover::find_point(store, &disk, &spec)
            .await
            .with_context(|| format!("machine {:?}: the recovery point of disk {disk}", m.name))?;
        let output = match o.mode {
            Mode::Failover => d.output.clone(),
            Mode::TestFailover => o.scratch.join(&plan.name).join(format!(
                "{}-{}.img",
                m.name,
                m.disks.iter().position(|x| x.disk == d.disk).unwrap_or(0)
            )),
        };
        points.insert(
            disk.to_string(),
            ChosenPoint {
                machine: m.name.clone(),
                point: p.id.clone(),
                time: crate::rfc3339(p.time_ns),
                app_consistent: p.kind == CutKind::App,
                output,
            },
        );
    }
    if o.mode == Mode::TestFailover {
        let dir = o.scratch.join(&plan.name);
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(RunState {
        plan: plan.name.clone(),
        run_id,
        mode: o.mode,
        point: o.point.clone(),
        plan_sha256: Some(plan.sha256.clone()),
        status: Status::Running,
        points,
        steps: Vec::new(),
        next: 0,
        started: Vec::new(),
        message: None,
    })
}

/// Fails over every disk of `group` at once, each to the point chosen for it.
async fn failover_group(
    store: &ripcord_store::Store,
    group: &Group,
    state: &RunState,
    o: &RunOptions,
    pass: &[u8],
) -> anyhow::Result<String> {
    let jobs = group.machines.iter().flat_map(|m| {
        m.disks.iter().map(move |d| async move {
            let disk: DiskId = crate::failover::parse_disk(&d.disk)?;
            let chosen = state
                .points
                .get(&disk.to_string())
                .with_context(|| format!("no point was chosen for disk {disk}"))?;
            let spec = PointSpec::Id(chosen.point.clone());
            let force = o.force && o.mode == Mode::Failover;
            let m_done = write_point(
                store,
                &disk,
                &spec,
                &chosen.output,
                Format::Raw,
                force,
                pass,
                false,
            )
            .await
            .with_context(|| format!("machine {:?}, disk {disk}", m.name))?;
            println!(
                "  {}: {}",
                m.name,
                crate::run_failover::describe(&disk, &chosen.output, &m_done)
            );
            anyhow::Ok(m_done.data_bytes)
        })
    });
    let results = futures::future::join_all(jobs).await;
    let mut bytes = 0;
    let mut failed = Vec::new();
    for r in results {
        match r {
            Ok(b) => bytes += b,
            Err(e) => failed.push(crate::error_text(&e)),
        }
    }
    ensure!(failed.is_empty(), "{}", failed.join("; "));
    Ok(format!(
        "{} machines, {} MiB of data",
        group.machines.len(),
        bytes >> 20
    ))
}

/// Starts every machine of `group` and waits until each is ready.
async fn start_group(
    group: &Group,
    state: &mut RunState,
    state_dir: &Path,
    env: &[(String, String)],
) -> anyhow::Result<String> {
    let mut handles = Vec::new();
    for m in &group.machines {
        let mut env = env.to_vec();
        env.push(("RIPCORD_GROUP".to_owned(), group.name.clone()));
        env.push(("RIPCORD_MACHINE".to_owned(), m.name.clone()));
        for (i, d) in m.disks.iter().enumerate() {
            let out = DiskId::from_hex(&d.disk)
                .and_then(|id| state.points.get(&id.to_string()))
                .map_or(d.output.clone(), |c| c.output.clone());
            env.push((format!("RIPCORD_DISK_{i}"), out.display().to_string()));
        }
        let child = match &m.start {
            Some(cmd) => {
                let log = state_dir.join(format!("{}-{}.log", state.plan, m.name));
                let child = spawn_start(cmd, &env, &log)
                    .with_context(|| format!("machine {:?}: starting it", m.name))?;
                state.started.push(Started {
                    machine: m.name.clone(),
                    pid: child.id() as i32,
                    log: log.clone(),
                });
                save_state(state_dir, state)?;
                println!(
                    "  {}: started (pid {}, log {})",
                    m.name,
                    child.id(),
                    log.display()
                );
                Some((child, log))
            }
            None => None,
        };
        let machine: Machine = m.clone();
        handles.push(tokio::task::spawn_blocking(move || {
            wait_ready(&machine, child, &env)
        }));
    }
    let mut failed = Vec::new();
    for (h, m) in handles.into_iter().zip(&group.machines) {
        match h.await? {
            Ok(()) => println!("  {}: ready", m.name),
            Err(e) => failed.push(format!("machine {:?}: {}", m.name, crate::error_text(&e))),
        }
    }
    ensure!(failed.is_empty(), "{}", failed.join("; "));
    Ok(format!("{} machines ready", group.machines.len()))
}

/// Takes `<state_dir>/<plan>.lock`, or says who has it (see the module doc).
fn lock_plan(state_dir: &Path, plan: &str) -> anyhow::Result<ripcord_crashsafe::FileLock> {
    let path = state_dir.join(format!("{plan}.lock"));
    ripcord_crashsafe::try_lock_exclusive(&path)
        .with_context(|| format!("locking {}", path.display()))?
        .with_context(|| {
            format!(
                "plan {plan:?} is being run by another `ripcord plan` process (it holds {}): \
                 wait until it finishes or pauses",
                path.display()
            )
        })
}

/// `ripcord plan cleanup`: stops what a test failover started and removes its images.
pub fn cleanup(plan_path: &Path, state_dir: &Path) -> anyhow::Result<()> {
    let plan = Plan::load(plan_path)?;
    if !state_dir.exists() {
        println!("plan {:?} has no run to clean up", plan.name);
        return Ok(());
    }
    let _lock = lock_plan(state_dir, &plan.name)?;
    let Some(state) = load_state(state_dir, &plan.name)? else {
        println!("plan {:?} has no run to clean up", plan.name);
        return Ok(());
    };
    ensure!(
        state.mode == Mode::TestFailover,
        "the last run of plan {:?} is a real failover: cleanup only undoes test failovers",
        plan.name
    );
    for s in &state.started {
        kill_group(s.pid, nix::sys::signal::Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for s in &state.started {
        let gone =
            |pid: i32| nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), None).is_err();
        while !gone(s.pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if !gone(s.pid) {
            kill_group(s.pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
    let mut removed = 0;
    for c in state.points.values() {
        for p in [
            c.output.clone(),
            ripcord_restore::output_guard::partial(&c.output),
        ] {
            match std::fs::remove_file(&p) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", p.display())),
            }
        }
    }
    let path = state_path(state_dir, &plan.name);
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    println!(
        "plan {:?}: stopped {} started process group(s), removed {removed} test image(s); the \
         report stays in {}",
        plan.name,
        state.started.len(),
        state_dir.join("reports").display()
    );
    Ok(())
}
