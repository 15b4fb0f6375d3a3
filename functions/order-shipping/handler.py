"""Ships an order: creates a shipment for order.created, cancels it for order.cancelled.

Its log is Lambda's JSON format (log_format in function.toml): each record is
one JSON object, with the order id as a field of its own to search by.
"""

import json
import logging

logger = logging.getLogger("shipping")


def handler(event, context):
    shipments = []
    for record in event["Records"]:
        sns = record["Sns"]
        order = json.loads(sns["Message"])
        action = "cancel shipment" if sns["Subject"] == "order.cancelled" else "ship"
        logger.info("shipping order %s: %s to %s", order["id"], action, order.get("address", "?"),
                    extra={"order_id": order["id"]})
        shipments.append({"order": order["id"], "action": action})
    return {"shipments": shipments}
