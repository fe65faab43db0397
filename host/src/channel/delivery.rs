//! The delivery window: at most [`DELIVERY_WINDOW`] replies are with the adapter at a time;
//! the rest wait here, in order, and the host hands back a reply the adapter gave up on.

use super::*;

impl Instance {
    /// Keep the replies beyond the delivery window (and all after them, for order) back.
    pub(super) fn hold_back_deliveries(&mut self, batch: Vec<Event>) -> Vec<Event> {
        let mut room = DELIVERY_WINDOW.saturating_sub(self.pending_replies.len());
        let mut admitted = Vec::with_capacity(batch.len());
        for event in batch {
            if matches!(event, Event::DeliverReply(_)) {
                if room == 0 || !self.delivery_backlog.is_empty() {
                    self.delivery_backlog.push_back(event);
                    continue;
                }
                room -= 1;
            }
            admitted.push(event);
        }
        admitted
    }

    /// Hand held-back replies to the adapter as the window frees up.
    pub(super) async fn release_deliveries(&mut self) {
        while !self.delivery_backlog.is_empty() && self.current.is_some() {
            let room = DELIVERY_WINDOW.saturating_sub(self.pending_replies.len());
            if room == 0 {
                return;
            }
            let take = room.min(self.delivery_backlog.len());
            let batch: Vec<Event> = self.delivery_backlog.drain(..take).collect();
            self.dispatch(batch).await;
        }
    }

    /// Hand a reply the adapter gave up on back to it later, from the store (it may have been
    /// confirmed meanwhile).
    pub(super) fn retry_delivery_later(&self, reply_id: u64, wait: Duration) {
        let router = self.shared.router.clone();
        let channel = self.id.clone();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            match router.queued_replies_async(&channel).await {
                Ok(queued) => {
                    if let Some(reply) = queued.into_iter().find(|r| r.id as u64 == reply_id) {
                        router.deliver(reply);
                    }
                }
                Err(e) => tracing::error!(channel, reply_id, "cannot read the delivery queue: {e}"),
            }
        });
    }
}
