//! Opening a disk's stream: the device name (protocol 3 on), `ContinueEpoch` when this
//! process continues the epoch (protocol 4 on), the `ProtectDisk`, and the server's answer:
//! where the stream resumes. A continued epoch's sender is made here, on the first
//! `EpochContinued`, since only then is it known where the epoch goes on.

use std::time::Instant;

use anyhow::{Context as _, bail};
use quinn::SendStream;
use ripcord_proto::{ContinueEpoch, ErrorCode, Message, ProtectDisk, Sender, describe_received};

use super::{DiskLink, FrameReader, Refused, send_msg};

/// Sends the stream's opening frames; returns the sequence the server resumes from (the
/// sender is connected there).
pub(super) async fn open_stream(
    send: &mut SendStream,
    reader: &mut FrameReader,
    version: u16,
    l: &mut DiskLink,
) -> anyhow::Result<u64> {
    let disk_hex = l.disk.to_string();
    // Protocol 3 on: the device name goes first, so the server's log line about the new
    // stream already carries it. A name the wire cannot carry is left out.
    if version >= 3 && ripcord_proto::wire::check_device_name(&l.device).is_ok() {
        let name = ripcord_proto::DiskName {
            disk_id: l.disk,
            device: l.device.clone(),
        };
        send_msg(send, &Message::DiskName(name)).await?;
    }
    if let Some(c) = &l.continuation {
        if version < 4 {
            let why = format!(
                "the process server speaks protocol {version}, and continuing an epoch needs 4"
            );
            let _ = c.refused.set(why.clone());
            return Err(Refused {
                disk: disk_hex,
                code: ErrorCode::CannotContinue,
                message: why,
            }
            .into());
        }
        let cont = ContinueEpoch {
            disk_id: l.disk,
            epoch: l.epoch,
        };
        send_msg(send, &Message::ContinueEpoch(cont)).await?;
    }
    let pd = ProtectDisk {
        disk_id: l.disk,
        size_bytes: l.size_bytes,
        sector_size: l.sector_size,
        epoch: l.epoch,
        wrapped_key: l.wrapped_key.clone().unwrap_or_default(),
    };
    send_msg(send, &Message::ProtectDisk(pd)).await?;
    let resume_from = match (reader.next().await?, &l.continuation) {
        (Some(Message::DiskAccepted(a)), None) => a.resume_from_seq,
        (Some(Message::EpochContinued(c)), Some(cont)) => {
            if cont.start.get().is_none() {
                // This process has sealed nothing yet: it begins where the server is.
                let durable = c.resume_from_seq.checked_sub(1).context("resume from 0")?;
                l.sender = Sender::continuing(
                    l.disk,
                    l.epoch,
                    l.sender_config.clone(),
                    durable,
                    c.next_cut_id,
                );
                let _ = cont.start.set(c.resume_from_seq);
                // What the server holds is acknowledged already: status shows it (and a
                // disk nothing changed on has its point without sending anything).
                l.stats
                    .acked_seq
                    .store(durable, std::sync::atomic::Ordering::Relaxed);
                l.stats.acked_cuts.store(
                    c.next_cut_id.saturating_sub(1),
                    std::sync::atomic::Ordering::Relaxed,
                );
                tracing::info!(
                    disk = %disk_hex, epoch = l.epoch, from_seq = c.resume_from_seq,
                    next_cut = c.next_cut_id, "the epoch continues under a new data key"
                );
            }
            c.resume_from_seq
        }
        (Some(Message::Error(e)), cont) => {
            if let (ErrorCode::CannotContinue, Some(c)) = (e.code, cont) {
                let _ = c.refused.set(e.message.clone());
            }
            return Err(Refused {
                disk: disk_hex,
                code: e.code,
                message: e.message,
            }
            .into());
        }
        (other, _) => bail!(
            "expected {}, got {}",
            if l.continuation.is_some() {
                "EpochContinued"
            } else {
                "DiskAccepted"
            },
            describe_received(other.as_ref().map(Message::message_type))
        ),
    };
    l.sender
        .handle_connected(Instant::now(), resume_from)
        .map_err(|e| anyhow::anyhow!("resume from {resume_from} refused: {e}"))?;
    Ok(resume_from)
}
