//! The session's control stream after the hello (protocol 5 on): clock probes against the
//! process server every [`PROBE_EVERY`], and the server's consistency-group schedule, both
//! into the shared [`GroupClock`](crate::replicate::group::GroupClock); protocol 6 on, the
//! machine's policy into the shared [`SharedPolicy`].

use std::time::Duration;

use anyhow::bail;
use quinn::SendStream;
use ripcord_proto::Message;

use super::{FrameReader, send_msg};
use crate::{
    clock::{now_mono_ns, now_wall_ns},
    replicate::{group::SharedGroupClock, policy::SharedPolicy},
};

/// How often the control stream probes the server's clock.
const PROBE_EVERY: Duration = Duration::from_millis(250);

/// The control stream after the hello (protocol 5 on): clock probes every
/// [`PROBE_EVERY`], and the server's group schedule, both into `clock`. Returns only on
/// failure (the disk streams end the session).
pub(super) async fn run(
    mut send: SendStream,
    mut reader: FrameReader,
    clock: &SharedGroupClock,
    policy: &SharedPolicy,
) -> anyhow::Result<()> {
    let mut nonce = 0u64;
    let mut outstanding: Option<(u64, u64)> = None;
    let mut ticker = tokio::time::interval(PROBE_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                nonce += 1;
                let sent = now_wall_ns();
                let probe = Message::TimeProbe(ripcord_proto::TimeProbe { nonce });
                send_msg(&mut send, &probe).await?;
                outstanding = Some((nonce, sent));
            }
            msg = reader.next() => match msg? {
                Some(Message::TimeReply(reply)) => {
                    let (received, mono) = (now_wall_ns(), now_mono_ns());
                    // Only the answer to the latest probe: an older one's send time is gone.
                    if let Some((_, sent)) = outstanding.take_if(|(n, _)| *n == reply.nonce) {
                        clock
                            .lock()
                            .expect("group clock lock")
                            .add_sample(sent, &reply, received, mono);
                    }
                }
                Some(Message::GroupSchedule(schedule)) => {
                    clock.lock().expect("group clock lock").set_schedule(schedule);
                }
                Some(Message::PolicyUpdate(update)) => policy.set(update),
                Some(other) => bail!("unexpected {} frame on the control stream", other.message_type()),
                None => bail!("the process server closed the control stream"),
            },
        }
    }
}
