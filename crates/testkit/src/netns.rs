//! A network namespace joined to the host by a veth pair, for the tests where a real
//! interface matters (issue 17): an agent whose address changes on its interface, a link
//! cut by nftables rules.
//!
//! [`Netns::new`] creates namespace `<name>` and the pair `h-<name>` (host side,
//! `10.<net>.0.1/24`) and `n-<name>` (inside, `10.<net>.0.2/24`), both up, and `lo` up
//! inside. Dropping it deletes the namespace, which deletes the pair and every nftables
//! rule made inside, even when the test failed. A namespace of the same name left by a
//! killed run is deleted first. Needs root, `ip` (iproute2) and, for [`Netns::nft`], `nft`
//! (nftables); `cargo xtask setup` installs both.

use std::{net::Ipv4Addr, path::Path, process::Command};

use anyhow::{Context as _, bail, ensure};

/// A network namespace with a veth pair to the host; deleted on drop.
pub struct Netns {
    pub name: String,
    /// The host side's address (reachable from inside).
    pub host_addr: Ipv4Addr,
    /// The namespace side's current address.
    pub addr: Ipv4Addr,
    net: u8,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (install iproute2: cargo xtask setup)")?;
    ensure!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

impl Netns {
    /// Namespace `name` (at most 12 characters: interface names are limited to 15) on
    /// subnet `10.<net>.0.0/24`.
    pub fn new(name: &str, net: u8) -> anyhow::Result<Netns> {
        ensure!(
            name.len() <= 12 && !name.is_empty(),
            "netns name {name:?} must be 1-12 characters"
        );
        // A namespace left by a killed run of this test.
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        let host_addr = Ipv4Addr::new(10, net, 0, 1);
        let addr = Ipv4Addr::new(10, net, 0, 2);
        ip(&["netns", "add", name])?;
        let ns = Netns {
            name: name.to_owned(),
            host_addr,
            addr,
            net,
        };
        let (host, inner) = (ns.host_if(), ns.inner_if());
        ip(&[
            "link", "add", &host, "type", "veth", "peer", "name", &inner, "netns", name,
        ])?;
        ip(&["addr", "add", &format!("{host_addr}/24"), "dev", &host])?;
        ip(&["link", "set", &host, "up"])?;
        // Removing the primary address must promote a secondary one, not delete every
        // address of the subnet with it (the kernel's default), or a changed address
        // would leave the interface with none.
        let promote = ns
            .exec("sh")
            .arg("-c")
            .arg(format!(
                "echo 1 > /proc/sys/net/ipv4/conf/{inner}/promote_secondaries"
            ))
            .status()
            .context("running sh in the namespace")?;
        ensure!(
            promote.success(),
            "enabling promote_secondaries on {inner} failed"
        );
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", &inner])?;
        ns.ip(&["link", "set", &inner, "up"])?;
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn host_if(&self) -> String {
        format!("h-{}", self.name)
    }

    fn inner_if(&self) -> String {
        format!("n-{}", self.name)
    }

    /// `ip -n <name> <args>`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A command that runs `program` inside the namespace (`ip netns exec` execs it).
    pub fn exec(&self, program: impl AsRef<Path>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program.as_ref());
        c
    }

    /// Moves the namespace side to `10.<net>.0.<host>`: the new address is added, then the
    /// old one removed, as a DHCP renewal or a failover of a floating address does. Sockets
    /// bound to the wildcard address send from the new one from then on.
    pub fn change_address(&mut self, host: u8) -> anyhow::Result<Ipv4Addr> {
        ensure!(host > 1 && host < 255, "host part {host} out of range");
        let new = Ipv4Addr::new(10, self.net, 0, host);
        ensure!(new != self.addr, "{new} is already the address");
        let inner = self.inner_if();
        self.ip(&["addr", "add", &format!("{new}/24"), "dev", &inner])?;
        self.ip(&["addr", "del", &format!("{}/24", self.addr), "dev", &inner])?;
        self.addr = new;
        Ok(new)
    }

    /// Loads an nftables script inside the namespace (`nft -f -`).
    pub fn nft(&self, script: &str) -> anyhow::Result<()> {
        use std::io::Write as _;
        let mut child = self
            .exec("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("running nft (install nftables: cargo xtask setup)")?;
        child
            .stdin
            .take()
            .context("nft stdin")?
            .write_all(script.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "nft -f - failed in {}: {}\nscript:\n{script}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("deleting network namespace {}: {e:#}", self.name);
        }
    }
}
