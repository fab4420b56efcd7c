// `--subnet` takes an id; a name works too when --vpc says which VPC it is in.
import type { Command } from "commander";
import { SubnetService } from "../../gen/microvpc/v1/subnet_pb.js";
import { client } from "./context.js";
import { EXIT } from "./errors.js";

const SUBNET_ID = /^subnet-[0-9a-f]{12}$/;

export async function subnetId(cmd: Command, subnet: string, vpc: string | undefined): Promise<string> {
  if (SUBNET_ID.test(subnet)) return subnet;
  if (!vpc) {
    cmd.error(
      `error: --subnet ${JSON.stringify(subnet)} is not a subnet id; pass the id (see \`microvpc subnet list\`) or add --vpc REF to look it up by name`,
      {
        exitCode: EXIT.usage,
      },
    );
  }
  const res = await client(cmd, SubnetService).getSubnet({ ref: subnet, vpc });
  return res.subnet!.id;
}
