//! The configuration role's status page (`GET /` or `/status` on the metrics endpoint):
//! every process server with its health colour and heartbeat, every machine with its
//! disks (server, epoch, acknowledged batch, newest recovery point, lag) and a chart of
//! each disk's lag over the last hour, and the open alerts.
//!
//! Server-rendered HTML that refreshes itself every few seconds: no script, no build
//! step, nothing fetched from elsewhere. Read from the configuration database opened
//! read-only, on the metrics thread (never a runtime worker). Every string from the
//! database is escaped. It is served where the metrics are (`metrics-listen`, localhost
//! by default): bind that address only where the people who may see the deployment are.

use std::{fmt::Write as _, path::Path};

use ripcord_control::{ControlDb, Disk};

/// Seconds between the page's refreshes.
const REFRESH_SECS: u32 = 5;

/// Chart size (SVG user units).
const CHART_W: f64 = 600.0;
const CHART_H: f64 = 120.0;

/// The page, from the database at `db`; an error page names the problem.
pub fn render(db: &Path) -> String {
    match render_inner(db) {
        Ok(page) => page,
        Err(e) => page(
            "ripcord status",
            &format!(
                "<p class=\"error\">the configuration database cannot be read: {}</p>",
                esc(&format!("{e:#}"))
            ),
        ),
    }
}

fn render_inner(db: &Path) -> anyhow::Result<String> {
    let db = ControlDb::open_read_only(db)?;
    let servers = db.process_servers()?;
    let machines = db.machines()?;
    let disks = db.disks()?;
    let alerts = db.open_alerts()?;
    let now = crate::control::unix_now();
    let history = db.lag_history(now - crate::control::LAG_KEEP_SECS)?;
    let ago = |t: Option<i64>| {
        t.map_or("never".to_owned(), |t| {
            format!("{} s ago", (now - t).max(0))
        })
    };
    let mut body = String::new();
    let _ = write!(
        body,
        "<p id=\"summary\">{} process server(s), {} machine(s), {} disk(s), {} open alert(s); \
         refreshed every {REFRESH_SECS} s</p>",
        servers.len(),
        machines.len(),
        disks.len(),
        alerts.len()
    );
    body.push_str(
        "<section id=\"servers\"><h2>Process servers</h2><table><thead><tr><th>Server</th>\
         <th>Health</th><th>Address</th><th>Version</th><th>Heartbeat</th><th>Machines</th>\
         <th>Roles</th></tr></thead><tbody>",
    );
    for s in &servers {
        let health = s.shown_health(now).as_str();
        let count = machines
            .iter()
            .filter(|m| m.process_server.as_deref() == Some(s.id.as_str()))
            .count();
        let _ = write!(
            body,
            "<tr class=\"server\" id=\"server-{id}\" data-health=\"{health}\"><td>{id}</td>\
             <td><span class=\"dot {health}\"></span><span class=\"health\">{health}</span></td>\
             <td>{addr}</td><td>{version}</td><td>{beat}</td><td>{count}</td><td>{roles}</td></tr>",
            id = esc(&s.id),
            addr = esc(&s.address),
            version = esc(&s.version),
            beat = ago(s.last_heartbeat),
            roles = if s.config_role {
                "config, process"
            } else {
                "process"
            },
        );
    }
    body.push_str("</tbody></table></section><section id=\"machines\"><h2>Machines</h2>");
    for m in &machines {
        let server = m.process_server.as_deref().unwrap_or("-");
        let health = servers
            .iter()
            .find(|s| s.id == server)
            .map_or("red", |s| s.shown_health(now).as_str());
        let _ = write!(
            body,
            "<article class=\"machine\" id=\"machine-{id}\" data-server=\"{server}\" \
             data-health=\"{health}\"><h3><span class=\"dot {health}\"></span>{id} \
             <small>on {server}</small></h3>",
            id = esc(&m.id),
            server = esc(server),
        );
        let mine: Vec<&Disk> = disks.iter().filter(|d| d.machine == m.id).collect();
        if mine.is_empty() {
            body.push_str("<p>no disk reported yet</p>");
        }
        for d in mine {
            let lag = d.lag_secs(now);
            let _ = write!(
                body,
                "<div class=\"disk\" id=\"disk-{id}\"><p><b>{device}</b> {id} · epoch {epoch} · \
                 batch {seq} · newest point {point} · lag <span class=\"lag\">{lag}</span></p>",
                id = esc(&d.id),
                device = esc(&d.device),
                epoch = d.epoch,
                seq = d.acked_seq,
                point = ago(d.last_point_at),
                lag = lag.map_or("-".to_owned(), |l| format!("{l} s")),
            );
            let samples: Vec<(i64, i64)> = history
                .iter()
                .filter(|(disk, _, _)| *disk == d.id)
                .map(|&(_, at, lag)| (at, lag))
                .collect();
            body.push_str(&chart(&d.id, &samples, now));
            body.push_str("</div>");
        }
        body.push_str("</article>");
    }
    body.push_str("</section><section id=\"alerts\"><h2>Alerts</h2>");
    if alerts.is_empty() {
        body.push_str("<p>none</p>");
    } else {
        body.push_str("<ul>");
        for a in &alerts {
            let _ = write!(
                body,
                "<li class=\"alert {severity}\">{severity} · {subject} · {kind}: {message} ({since})</li>",
                severity = esc(&a.severity),
                subject = esc(&a.subject),
                kind = esc(&a.kind),
                message = esc(&a.message),
                since = ago(Some(a.raised_at)),
            );
        }
        body.push_str("</ul>");
    }
    body.push_str("</section>");
    Ok(page("ripcord status", &body))
}

/// An SVG line chart of `samples` (time, lag seconds) up to `now`, over the span they
/// cover (at least a minute, at most the hour samples are kept), scaled to the highest.
fn chart(disk: &str, samples: &[(i64, i64)], now: i64) -> String {
    let first = samples.first().map_or(now, |&(at, _)| at);
    let span = (now - first).clamp(60, crate::control::LAG_KEEP_SECS);
    let max = samples.iter().map(|&(_, l)| l).max().unwrap_or(0).max(1);
    let points: Vec<String> = samples
        .iter()
        .map(|&(at, lag)| {
            let x = (CHART_W * (1.0 - (now - at) as f64 / span as f64)).clamp(0.0, CHART_W);
            let y = CHART_H - CHART_H * (lag as f64 / max as f64);
            format!("{x:.1},{y:.1}")
        })
        .collect();
    let span_text = humantime::format_duration(std::time::Duration::from_secs(span as u64));
    format!(
        "<figure class=\"lag-chart\"><svg id=\"chart-{id}\" viewBox=\"0 0 {w} {h}\" \
         width=\"{w}\" height=\"{h}\" role=\"img\" aria-label=\"lag of {id}\">\
         <rect width=\"{w}\" height=\"{h}\" class=\"plot\"/>\
         <polyline class=\"lag-line\" data-samples=\"{n}\" points=\"{points}\"/>\
         <text x=\"4\" y=\"14\">{max} s</text><text x=\"4\" y=\"{base}\">-{span_text}</text>\
         <text x=\"{right}\" y=\"{base}\" text-anchor=\"end\">now</text></svg>\
         <figcaption>lag (age of the newest recovery point): {n} sample(s) over the last \
         {span_text}, highest {max} s</figcaption></figure>",
        id = esc(disk),
        w = CHART_W,
        h = CHART_H,
        n = samples.len(),
        points = points.join(" "),
        base = CHART_H - 4.0,
        right = CHART_W - 4.0,
    )
}

fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">\
         <title>{title}</title><style>{STYLE}</style></head>\
         <body><h1>ripcord</h1>{body}</body></html>"
    )
}

const STYLE: &str = "body{font-family:sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse}td,th{padding:.3em .8em;border-bottom:1px solid #ddd;text-align:left}\
.dot{display:inline-block;width:.8em;height:.8em;border-radius:50%;margin-right:.4em}\
.dot.green{background:#2a2}.dot.orange{background:#e90}.dot.red{background:#d22}\
.machine{border:1px solid #ccc;border-radius:6px;padding:.5em 1em;margin:1em 0}\
.plot{fill:#f7f7f7}svg text{font-size:11px;fill:#666}.lag-line{fill:none;stroke:#36c;stroke-width:2}\
.alert.critical{color:#b00}.alert.warning{color:#a60}";

/// Escapes text for HTML content and attribute values.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_the_database_is_escaped() {
        assert_eq!(
            esc("<script>\"a\" & 'b'</script>"),
            "&lt;script&gt;&quot;a&quot; &amp; &#39;b&#39;&lt;/script&gt;"
        );
    }

    #[test]
    fn the_chart_spans_the_last_hour_and_scales_to_the_highest_lag() {
        let svg = chart("d1", &[(0, 0), (1800, 10), (3600, 5)], 3600);
        assert!(
            svg.contains("points=\"0.0,120.0 300.0,0.0 600.0,60.0\""),
            "{svg}"
        );
        assert!(svg.contains("data-samples=\"3\""), "{svg}");
        assert!(svg.contains(">10 s<") && svg.contains("-1h<"), "{svg}");
        // A young disk's samples fill the chart (a minute at least), not its last pixel.
        let svg = chart("d1", &[(100, 2), (130, 4)], 160);
        assert!(svg.contains("points=\"0.0,60.0 300.0,0.0\""), "{svg}");
        assert!(chart("d1", &[], 10).contains("data-samples=\"0\""));
    }

    #[test]
    fn a_missing_database_is_named_on_the_page() {
        let tmp = tempfile::tempdir().unwrap();
        let page = render(&tmp.path().join("control.db"));
        assert!(
            page.contains("cannot be read") && page.contains("control.db"),
            "{page}"
        );
    }
}
