//! The agent in its own network namespace, talking to the server over a veth pair: faults
//! of a real interface (an address that changes, nftables rules that cut the link).
//!
//! The process server listens on 127.0.0.1 of the host; a relay ([`FaultProxy`] with no
//! faults, see [`replicating`]) on the host side of the veth pair forwards to it, so that
//! the agent's datagrams cross the interface the test changes.

use super::*;

/// Connection migration on a real interface (issue 17, item 2): the agent's address on
/// its interface changes twice while it writes (the new address added, the old one
/// removed, as a DHCP renewal or a moved floating address does). Its QUIC connection
/// follows: no reconnect, no new epoch, only the changed data sent, replica equal.
#[test]
fn an_agent_whose_interface_address_changes_keeps_its_connection() {
    let Some(Replicating {
        mut site,
        disk,
        proxy: relay,
        agent,
        netns,
        disk_id,
        before,
        epoch,
    }) = replicating(Setup {
        test: "an_agent_whose_interface_address_changes_keeps_its_connection",
        disk_mib: 64,
        prefill_mib: 8,
        seed: 31,
        netns: Some(("rc-migrate", 231)),
        ..Setup::default()
    })
    else {
        return;
    };
    let mut ns = netns.expect("a namespace");

    let w = Writer::start(&disk.path, 32);
    for host in [7, 9] {
        std::thread::sleep(Duration::from_secs(2));
        let acked = num(&disk_stats(&agent), "acked_seq");
        let addr = ns.change_address(host).unwrap();
        eprintln!("the agent's interface now has {addr} only");
        wait_for(
            "batches acknowledged from the new address",
            Duration::from_secs(30),
            || Ok(num(&disk_stats(&agent), "acked_seq") > acked),
        )
        .unwrap_or_else(|e| panic!("{e:#}:\n{}", agent.log()));
    }
    std::thread::sleep(Duration::from_secs(1));
    let written = w.finish();
    let counts = relay.counts();
    let done = quiesce(&mut site, agent, &disk.path, &disk_id, epoch);
    eprintln!("relay: {counts:?}\nat the end {}", done.stats);
    // The relay saw the agent come from three addresses (the first and two new ones).
    assert_eq!(
        counts.clients, 3,
        "the relay did not see the agent from three addresses: {counts:?}"
    );
    assert_eq!(
        num(&done.stats, "reconnects"),
        0,
        "the agent reconnected instead of migrating:\n{}",
        done.log
    );
    let sent = num(&done.stats, "data_bytes") - num(&before, "data_bytes");
    assert!(
        sent < written + 8 * MIB,
        "the agent sent {sent} B of data after its initial sync for {written} B written"
    );
}

/// A link cut by the firewall: nftables rules inside the agent's namespace drop its
/// datagrams to the server (and the answers) for 15 s, longer than the idle timeout.
/// Nothing is acknowledged meanwhile; once the rules are deleted the agent reconnects and
/// continues in the same epoch, and the replica equals the device.
#[test]
fn a_firewall_cut_heals_without_a_resync() {
    let Some(Replicating {
        mut site,
        disk,
        proxy: relay,
        agent,
        netns,
        disk_id,
        before,
        epoch,
    }) = replicating(Setup {
        test: "a_firewall_cut_heals_without_a_resync",
        disk_mib: 64,
        prefill_mib: 16,
        seed: 41,
        netns: Some(("rc-nft", 232)),
        ..Setup::default()
    })
    else {
        return;
    };
    let ns = netns.expect("a namespace");
    let port = relay.addr().port();

    let w = Writer::start(&disk.path, 42);
    std::thread::sleep(Duration::from_secs(2));
    ns.nft(&format!(
        "table inet ripcord_cut {{\n\
         \tchain out {{ type filter hook output priority 0; policy accept;\n\
         \t\tip daddr {host} udp dport {port} counter drop\n\t}}\n\
         \tchain in {{ type filter hook input priority 0; policy accept;\n\
         \t\tip saddr {host} udp sport {port} counter drop\n\t}}\n}}\n",
        host = ns.host_addr
    ))
    .unwrap();
    let cut = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let acked_in = num(&disk_stats(&agent), "acked_seq");
    while cut.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(250));
    }
    let during = disk_stats(&agent);
    let rules = ns
        .exec("nft")
        .args(["list", "table", "inet", "ripcord_cut"])
        .output()
        .unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout).into_owned();
    ns.nft("delete table inet ripcord_cut\n").unwrap();
    assert_eq!(
        num(&during, "acked_seq"),
        acked_in,
        "batches were acknowledged through the firewall: {during}"
    );
    // The rules really dropped datagrams (their counters).
    let dropped_out = rules
        .lines()
        .find(|l| l.contains("udp dport"))
        .and_then(|l| l.split("counter packets ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(dropped_out > 0, "the output rule dropped nothing:\n{rules}");
    let pushed = num(&disk_stats(&agent), "pushed_seq");
    wait_for(
        "acknowledgements after the cut",
        Duration::from_secs(60),
        || Ok(num(&disk_stats(&agent), "acked_seq") >= pushed),
    )
    .unwrap_or_else(|e| panic!("{e:#}; stats {}\n{}", disk_stats(&agent), agent.log()));
    std::thread::sleep(Duration::from_secs(2));
    let written = w.finish();
    let done = quiesce(&mut site, agent, &disk.path, &disk_id, epoch);
    eprintln!(
        "rules at the end of the cut:\n{rules}\nat the end {}",
        done.stats
    );
    assert!(
        num(&done.stats, "reconnects") > 0,
        "the agent never reconnected across a 15 s cut: {}",
        done.stats
    );
    assert_no_second_copy(&before, &done.stats, written);
    drop(ns);
}
