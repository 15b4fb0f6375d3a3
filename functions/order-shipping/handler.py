"""Ships an order: creates a shipment for order.created, cancels it for order.cancelled."""

import json


def handler(event, context):
    shipments = []
    for record in event["Records"]:
        sns = record["Sns"]
        order = json.loads(sns["Message"])
        action = "cancel shipment" if sns["Subject"] == "order.cancelled" else "ship"
        print(f"shipping order {order['id']}: {action} to {order.get('address', '?')}")
        shipments.append({"order": order["id"], "action": action})
    return {"shipments": shipments}
